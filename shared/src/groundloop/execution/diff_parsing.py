"""A unified diff's model (`FilePatch`, `Hunk`) and reading diff text into it (`parse_diff`).

Part of the unified-diff format described in `groundloop.execution.diffs`, which re-exports
these names; every refusal is a `PatchRejected` with a reason an LLM can act on.
"""

from __future__ import annotations

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
