"""The unified-diff text format: its model, reading it, applying it to a text, writing it.

Reads unified diffs as LLMs and `git diff` write them (`diff --git` / `---` / `+++` / `@@`
hunks, `a/` `b/` prefixes optional, `/dev/null` for created or deleted files, "\\ No newline
at end of file" markers) into `FilePatch`es (`parse_diff`), applies one to a file's text
(`patch_text`) and writes the normalised form (`make_diff`). Every refusal is a
`PatchRejected` with a reason an LLM can act on:
- parsing: hunk line counts must match their headers; binary patches, NUL bytes, renames,
  copies and mode changes are refused, and so is a file named twice;
- applying: context must match exactly, except for trailing whitespace; hunks apply in order,
  at their stated line (or shifted by the previous hunk's drift) or else at the one place
  their context occurs; an ambiguous or missing context is rejected, never fuzzed.

Pure functions over strings, separate from `groundloop.execution.applier`, which owns everything about
files (path safety, the editable/protected policy, all-or-nothing writes) and re-exports the
names here, where callers have always imported them.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field

DEV_NULL = "/dev/null"
_HUNK_HEADER = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")
_UNSUPPORTED_HEADERS = (
    "old mode",
    "new mode",
    "rename from",
    "rename to",
    "copy from",
    "copy to",
    "similarity index",
    "dissimilarity index",
)


class PatchRejected(ValueError):
    """A diff that must never be applied; `reason` says what is wrong and how to fix it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Hunk:
    old_start: int
    old_len: int
    new_start: int
    new_len: int
    header: str
    # (tag, line) with tag in " -+"; `line` keeps its "\n" unless a "\ No newline" marker followed.
    lines: list[tuple[str, str]] = field(default_factory=list)

    @property
    def old_lines(self) -> list[str]:
        return [text for tag, text in self.lines if tag != "+"]


@dataclass
class FilePatch:
    path: str
    new_file: bool = False
    deleted: bool = False
    hunks: list[Hunk] = field(default_factory=list)


# ---------------------------------------------------------------------------------- parsing


def split_lines(text: str) -> list[str]:
    """Lines with their "\n" kept; only "\n" ends a line (str.splitlines also splits on \r,
    \x0c, \u2028 ..., which would corrupt files that contain them)."""
    lines = text.split("\n")
    out = [line + "\n" for line in lines[:-1]]
    if lines[-1]:
        out.append(lines[-1])
    return out


def _header_path(raw: str) -> str:
    # GNU diff appends "\t<timestamp>"; LLMs sometimes leave trailing spaces.
    path = raw.split("\t", 1)[0].rstrip()
    if path.startswith('"'):
        raise PatchRejected(f"quoted path {path} is not supported; use plain file names")
    return path


def _strip_prefixes(old: str, new: str) -> tuple[str, str]:
    """Drop git's a/ b/ prefixes when the pair clearly uses them; plain paths pass through."""
    old_prefixed = old.startswith("a/") or old == DEV_NULL
    new_prefixed = new.startswith("b/") or new == DEV_NULL
    if old_prefixed and new_prefixed and not (old == DEV_NULL and new == DEV_NULL):
        old = old if old == DEV_NULL else old[2:]
        new = new if new == DEV_NULL else new[2:]
    return old, new


def _git_header_path(line: str) -> str:
    rest = line[len("diff --git ") :].rstrip()
    half = (len(rest) - 5) // 2
    if rest.startswith("a/") and rest == f"a/{rest[2 : 2 + half]} b/{rest[2 : 2 + half]}":
        return rest[2 : 2 + half]
    half = (len(rest) - 1) // 2
    if rest == f"{rest[:half]} {rest[:half]}":
        return rest[:half]
    raise PatchRejected(f"cannot read the file name from {line!r}; add ---/+++ lines")


class _Section:
    """One file's part of a diff while it is being read."""

    def __init__(self, git_line: str | None) -> None:
        self.git_line = git_line
        self.old: str | None = None
        self.new: str | None = None
        self.new_mode = False
        self.deleted_mode = False
        self.hunks: list[Hunk] = []

    def finish(self) -> FilePatch:
        if self.old is None or self.new is None:
            if self.git_line is None or not (self.new_mode or self.deleted_mode):
                where = self.git_line or "a file section"
                raise PatchRejected(f"{where!r} has no ---/+++ lines and no hunks")
            path = _git_header_path(self.git_line)  # empty file created or deleted
            return FilePatch(path, new_file=self.new_mode, deleted=self.deleted_mode)
        old, new = _strip_prefixes(self.old, self.new)
        if old == DEV_NULL and new == DEV_NULL:
            raise PatchRejected("a file section has /dev/null on both sides")
        if old != DEV_NULL and new != DEV_NULL and old != new:
            raise PatchRejected(
                f"renaming {old} to {new} is not supported; delete and create files instead"
            )
        patch = FilePatch(
            new if old == DEV_NULL else old,
            new_file=old == DEV_NULL,
            deleted=new == DEV_NULL,
            hunks=self.hunks,
        )
        if not patch.hunks and not (patch.new_file or patch.deleted):
            raise PatchRejected(f"the section for {patch.path} has no @@ hunks")
        if patch.new_file and any(h.old_len for h in patch.hunks):
            raise PatchRejected(f"{patch.path} is created (--- /dev/null) but a hunk removes lines")
        return patch


def _parse_hunk(lines: list[str], i: int, path: str) -> tuple[Hunk, int]:
    header = lines[i]
    match = _HUNK_HEADER.match(header)
    if not match:
        raise PatchRejected(
            f"malformed hunk header {header!r} in {path}; "
            "expected '@@ -start,count +start,count @@'"
        )
    a, b, c, d = match.groups()
    hunk = Hunk(
        int(a),
        int(b) if b is not None else 1,
        int(c),
        int(d) if d is not None else 1,
        header.rstrip(),
    )
    old_left, new_left = hunk.old_len, hunk.new_len
    j = i + 1

    def mismatch(what: str) -> PatchRejected:
        seen_old = hunk.old_len - old_left
        seen_new = hunk.new_len - new_left
        return PatchRejected(
            f"hunk {hunk.header!r} in {path}: {what}; its header promises {hunk.old_len} old and "
            f"{hunk.new_len} new lines but the body has {seen_old} and {seen_new} so far. "
            "Fix the counts in the @@ header (or regenerate the diff)."
        )

    while old_left > 0 or new_left > 0:
        if j >= len(lines):
            raise mismatch("the diff ends inside the hunk")
        line = lines[j]
        if line.startswith("\\"):
            _mark_no_newline(hunk, path)
            j += 1
            continue
        tag, text = (" ", "") if line == "" else (line[0], line[1:])  # "" = blank context line
        if tag not in " -+":
            raise mismatch(f"line {line[:60]!r} is not a context, removed or added line")
        old_left -= tag != "+"
        new_left -= tag != "-"
        if old_left < 0 or new_left < 0:
            raise mismatch(f"line {line[:60]!r} is one too many")
        hunk.lines.append((tag, text + "\n"))
        j += 1
    while j < len(lines) and lines[j].startswith("\\"):
        _mark_no_newline(hunk, path)
        j += 1
    return hunk, j


def _mark_no_newline(hunk: Hunk, path: str) -> None:
    if not hunk.lines:
        raise PatchRejected(f"a '\\ No newline' marker starts hunk {hunk.header!r} in {path}")
    tag, text = hunk.lines[-1]
    hunk.lines[-1] = (tag, text.removesuffix("\n"))


def parse_diff(text: str) -> list[FilePatch]:
    """Every file section of a unified diff; prose before the first section is ignored."""
    if "\0" in text:
        raise PatchRejected("the diff contains NUL bytes (binary content); only text edits apply")
    if text.count("\r\n") == text.count("\n") > 0:  # a diff whose transport added CRs
        text = text.replace("\r\n", "\n")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    sections: list[_Section] = []
    current: _Section | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("GIT binary patch") or (
            line.startswith("Binary files ") and line.rstrip().endswith(" differ")
        ):
            raise PatchRejected("binary patches are not supported; only text files may change")
        if line.startswith("diff --git "):
            current = _Section(line)
            sections.append(current)
        elif line.startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ "):
            if current is None or current.old is not None or current.hunks:
                current = _Section(None)
                sections.append(current)
            current.old, current.new = _header_path(line[4:]), _header_path(lines[i + 1][4:])
            i += 2
            continue
        elif line.startswith("@@"):
            if current is None or current.new is None:
                raise PatchRejected(f"hunk {line!r} comes before any ---/+++ file header")
            hunk, i = _parse_hunk(lines, i, current.new)
            current.hunks.append(hunk)
            continue
        elif current is not None and current.old is None and not current.hunks:
            if line.startswith("new file mode"):
                current.new_mode = True
            elif line.startswith("deleted file mode"):
                current.deleted_mode = True
            elif line.startswith(_UNSUPPORTED_HEADERS):
                raise PatchRejected(
                    f"{line.strip()!r}: renames, copies and mode changes are "
                    "not supported; only edit file contents"
                )
        elif current is not None and current.hunks and line[:1] in ("+", "-", " "):
            raise PatchRejected(
                f"line {line[:60]!r} after hunk {current.hunks[-1].header!r} lies outside any "
                "hunk: the hunk's @@ line counts are too small"
            )
        i += 1
    patches = [section.finish() for section in sections]
    seen: set[str] = set()
    for patch in patches:
        if patch.path in seen:
            raise PatchRejected(f"{patch.path} appears twice; put all its hunks in one section")
        seen.add(patch.path)
    return patches


# ---------------------------------------------------------------------- applying to a text


def _same(a: str, b: str) -> bool:
    return a.rstrip() == b.rstrip()  # the one tolerance: trailing whitespace (and \r, \n)


def _matches_at(source: list[str], old: list[str], pos: int) -> bool:
    if pos < 0 or pos + len(old) > len(source):
        return False
    return all(_same(source[pos + k], line) for k, line in enumerate(old))


def _describe_mismatch(source: list[str], old: list[str], pos: int) -> str:
    for k, line in enumerate(old):
        if pos + k >= len(source):
            return f"the file ends (line {len(source)}) before the hunk's context does"
        if not _same(source[pos + k], line):
            return (
                f"line {pos + k + 1} should be {line.rstrip()!r} "
                f"but is {source[pos + k].rstrip()!r}"
            )
    return "it matches"


def patch_text(original: str, patch: FilePatch) -> str:
    """`original` with the hunks of `patch` applied, or PatchRejected."""
    source = split_lines(original)
    result: list[str] = []
    prev_end = 0  # hunks apply in order: the next one starts after the previous one ended
    drift = 0
    for number, hunk in enumerate(patch.hunks, 1):
        old = hunk.old_lines
        stated = hunk.old_start if not old else hunk.old_start - 1
        where = f"hunk {number} ({hunk.header}) of {patch.path}"
        if not old:  # pure insertion: nothing to search for, the line number decides
            pos = stated + drift
            if not prev_end <= pos <= len(source):
                raise PatchRejected(
                    f"{where} inserts at line {pos}, outside the file "
                    f"(lines {prev_end}..{len(source)} are possible)"
                )
        else:
            candidates = [
                p
                for p in dict.fromkeys((stated, stated + drift))
                if p >= prev_end and _matches_at(source, old, p)
            ]
            if candidates:
                pos = candidates[0]
            else:
                found = [
                    p
                    for p in range(prev_end, len(source) - len(old) + 1)
                    if _matches_at(source, old, p)
                ]
                if not found:
                    raise PatchRejected(
                        f"{where} does not match the file: at its stated position "
                        f"{_describe_mismatch(source, old, max(stated, 0))}, and its context and removed "
                        "lines occur nowhere after the previous hunk. Context must match the file "
                        "exactly (only trailing whitespace may differ); copy it from the file."
                    )
                if len(found) > 1:
                    raise PatchRejected(
                        f"{where}: its context occurs {len(found)} times (lines "
                        f"{', '.join(str(p + 1) for p in found[:5])}) and its line number "
                        "matches none of them; add more context lines or fix the line number."
                    )
                pos = found[0]
        result.extend(source[prev_end:pos])
        k = pos
        for tag, text in hunk.lines:
            if tag == " ":
                result.append(source[k])  # context keeps the file's own bytes
                k += 1
            elif tag == "-":
                k += 1
            else:
                result.append(text)
        drift = pos - stated
        prev_end = pos + len(old)
    result.extend(source[prev_end:])
    # A tolerated missing "\ No newline" marker must not glue two lines together.
    for k in range(len(result) - 1):
        if not result[k].endswith("\n"):
            result[k] += "\n"
    return "".join(result)


# ------------------------------------------------------------------------------- producing


def _range(start: int, length: int) -> str:
    if length == 1:
        return str(start + 1)
    return f"{start if length == 0 else start + 1},{length}"


def _diff_lines(prefix: str, line: str) -> list[str]:
    if line.endswith("\n"):
        return [prefix + line[:-1]]
    return [prefix + line, "\\ No newline at end of file"]


def make_diff(before: dict[str, str], after: dict[str, str], context: int = 3) -> str:
    """A normalised git-style unified diff turning `before` into `after` (path -> text; a path
    missing on one side is created or deleted). apply(make_diff(a, b)) == b."""
    out: list[str] = []
    for path in sorted(set(before) | set(after)):
        old, new = before.get(path), after.get(path)
        if old == new:
            continue
        out.append(f"diff --git a/{path} b/{path}")
        if old is None:
            out.append("new file mode 100644")
        elif new is None:
            out.append("deleted file mode 100644")
        a, b = split_lines(old or ""), split_lines(new or "")
        if not a and not b:
            continue  # an empty file created or deleted: the mode line says it all
        out.append("--- /dev/null" if old is None else f"--- a/{path}")
        out.append("+++ /dev/null" if new is None else f"+++ b/{path}")
        for group in difflib.SequenceMatcher(None, a, b, autojunk=False).get_grouped_opcodes(
            context
        ):
            i1, i2, j1, j2 = group[0][1], group[-1][2], group[0][3], group[-1][4]
            out.append(f"@@ -{_range(i1, i2 - i1)} +{_range(j1, j2 - j1)} @@")
            for tag, a1, a2, b1, b2 in group:
                if tag == "equal":
                    for line in a[a1:a2]:
                        out.extend(_diff_lines(" ", line))
                    continue
                for line in a[a1:a2]:
                    out.extend(_diff_lines("-", line))
                for line in b[b1:b2]:
                    out.extend(_diff_lines("+", line))
    return "\n".join(out) + "\n" if out else ""
