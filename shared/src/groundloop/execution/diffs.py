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

The model and the reading live in `groundloop.execution.diff_parsing` (re-exported here);
this module applies and writes. Pure functions over strings, separate from
`groundloop.execution.applier`, which owns everything about files (path safety, the
editable/protected policy, all-or-nothing writes) and re-exports the names here, where
callers have always imported them.
"""

from __future__ import annotations

import difflib

from groundloop.execution.diff_parsing import DEV_NULL as DEV_NULL
from groundloop.execution.diff_parsing import FilePatch as FilePatch
from groundloop.execution.diff_parsing import Hunk as Hunk
from groundloop.execution.diff_parsing import PatchRejected as PatchRejected
from groundloop.execution.diff_parsing import parse_diff as parse_diff


def split_lines(text: str) -> list[str]:
    """Lines with their "\n" kept; only "\n" ends a line (str.splitlines also splits on \r,
    \x0c, \u2028 ..., which would corrupt files that contain them)."""
    lines = text.split("\n")
    out = [line + "\n" for line in lines[:-1]]
    if lines[-1]:
        out.append(lines[-1])
    return out


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
