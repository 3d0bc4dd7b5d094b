"""A strict, path-safe unified-diff applier (no `patch` binary, no fuzz, no backup files).

Applies diffs (read and matched by `groundloop.execution.diffs`) to a workspace (`apply_diff`) or to
in-memory files (`apply_to_sources`), or converts aider-style SEARCH/REPLACE blocks into such
a diff (`search_replace_to_diff`). Used by the implementer (to check an LLM's patch) and by
the runner (via `groundloop.execution.environment.Environment.materialize`). The diff format itself
lives in `groundloop.execution.diffs`; its names (`PatchRejected`, `parse_diff`, `make_diff`,
`patch_text`, `FilePatch`, …) are re-exported here, where callers have always imported them.

The rules, each of which raises `PatchRejected` with a reason an LLM can act on:
- a path must be relative, without `..`, inside the root, never through a symlink, and name an
  editable file (or a new file matching a `new_files` glob); protected files are named as such;
- context must match exactly, except for trailing whitespace, and is never fuzzed; hunk line
  counts must match their headers; binary patches, NUL bytes, renames and mode changes are
  refused (all checked by `groundloop.execution.diffs`); diffs larger than `max_bytes` are refused unread;
- all or nothing: every file is patched in memory first, and nothing is written unless all
  succeed. Writes go through a temporary file and `os.replace`, so no `.orig`/`.rej` is left.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from groundloop.execution.diffs import DEV_NULL as DEV_NULL
from groundloop.execution.diffs import FilePatch, PatchRejected, make_diff, parse_diff, patch_text
from groundloop.execution.diffs import Hunk as Hunk

# --------------------------------------------------------------------------------- applying


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """`*` and `?` stay inside one path component; `**/` spans directories."""
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:[^/]+/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def check_relative_path(path: str) -> str:
    """`path` normalised, if it is a plain relative path; PatchRejected otherwise."""
    if not path or "\0" in path or "\\" in path:
        raise PatchRejected(f"path {path!r} is empty or contains a backslash or NUL")
    pure = PurePosixPath(path)
    if pure.is_absolute() or re.match(r"^[A-Za-z]:", path):
        raise PatchRejected(f"path {path!r} is absolute; use a path relative to the codebase")
    if ".." in pure.parts:
        raise PatchRejected(
            f"path {path!r} contains '..'; files outside the codebase are off limits"
        )
    normal = str(pure)
    if normal in ("", "."):
        raise PatchRejected(f"path {path!r} does not name a file")
    return normal


class _Policy:
    def __init__(
        self, editable: Iterable[str], new_files: Iterable[str], protected: Iterable[str]
    ) -> None:
        self.editable = {str(PurePosixPath(p)) for p in editable}
        self.protected = {str(PurePosixPath(p)) for p in protected}
        self.new_globs = [_glob_regex(g) for g in new_files]

    def check(self, path: str, *, exists: bool, patch: FilePatch) -> None:
        if path in self.protected:
            raise PatchRejected(
                f"{path} is protected (evaluation, data or limits); an idea may not change it"
            )
        if patch.new_file:
            if exists:
                raise PatchRejected(
                    f"{path} already exists; edit it with a normal hunk "
                    "instead of creating it from /dev/null"
                )
            if path not in self.editable and not any(g.match(path) for g in self.new_globs):
                raise PatchRejected(
                    f"creating {path} is not allowed; new files must match one "
                    f"of {[g.pattern for g in self.new_globs] or 'no patterns'}"
                )
            return
        if not exists:
            raise PatchRejected(f"{path} does not exist; create it with '--- /dev/null'")
        if path not in self.editable:
            raise PatchRejected(f"{path} is not editable; editable files: {sorted(self.editable)}")


def apply_to_sources(
    sources: dict[str, str],
    diff: str,
    *,
    editable: Iterable[str] | None = None,
    new_files: Iterable[str] = (),
    protected: Iterable[str] = (),
    max_bytes: int = 1_000_000,
) -> dict[str, str | None]:
    """Apply `diff` to in-memory files; returns path -> new text (None = deleted) for the
    files it changes. `editable=None` means every file in `sources` is editable."""
    if len(diff.encode("utf-8", "surrogatepass")) > max_bytes:
        raise PatchRejected(f"the diff is larger than {max_bytes} bytes; make a smaller change")
    policy = _Policy(sources if editable is None else editable, new_files, protected)
    changed: dict[str, str | None] = {}
    for patch in parse_diff(diff):
        path = check_relative_path(patch.path)
        policy.check(path, exists=path in sources, patch=patch)
        changed[path] = _patched(path, sources.get(path, ""), patch)
    return changed


def _patched(path: str, original: str, patch: FilePatch) -> str | None:
    if "\0" in original:
        raise PatchRejected(f"{path} is a binary file; only text files may be patched")
    new_text = patch_text(original, patch)
    if patch.deleted:
        if new_text:
            raise PatchRejected(
                f"the diff deletes {path} (+++ /dev/null) but its hunks do not "
                "remove every line of it"
            )
        return None
    return new_text


def _resolve_target(root: Path, path: str) -> Path:
    """root/path after checking that nothing on the way is a symlink or leaves the root."""
    current = root
    parts = PurePosixPath(path).parts
    for index, part in enumerate(parts):
        current = current / part
        if current.is_symlink():
            raise PatchRejected(
                f"{path} goes through the symlink {'/'.join(parts[: index + 1])}; "
                "symlinks are never followed"
            )
        if index < len(parts) - 1 and current.exists() and not current.is_dir():
            raise PatchRejected(f"{path}: {'/'.join(parts[: index + 1])} is not a directory")
    if not current.resolve().is_relative_to(root):
        raise PatchRejected(f"{path} resolves outside the workspace")
    if current.exists() and not current.is_file():
        raise PatchRejected(f"{path} exists but is not a regular file")
    return current


def _read_text(target: Path, path: str) -> str:
    try:
        data = target.read_bytes()
    except OSError as exc:
        raise PatchRejected(f"cannot read {path}: {exc.strerror}") from None
    if b"\0" in data:
        raise PatchRejected(f"{path} is a binary file; only text files may be patched")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise PatchRejected(f"{path} is not UTF-8 text; only text files may be patched") from None


def apply_diff(
    root: Path,
    diff: str,
    *,
    editable: set[str] | list[str],
    new_files: Iterable[str] = (),
    protected: Iterable[str] = (),
    max_bytes: int = 1_000_000,
) -> list[str]:
    """Apply `diff` to the files under `root`; returns the changed paths in diff order.

    All or nothing: on PatchRejected nothing was written. An OSError while writing (disk full)
    rolls back the files already written and is re-raised: it is not the diff's fault.
    """
    if len(diff.encode("utf-8", "surrogatepass")) > max_bytes:
        raise PatchRejected(f"the diff is larger than {max_bytes} bytes; make a smaller change")
    root = Path(root).resolve()
    policy = _Policy(editable, new_files, protected)
    planned: list[tuple[Path, str, str | None, bytes | None]] = []  # target, path, new, old
    for patch in parse_diff(diff):
        path = check_relative_path(patch.path)
        target = _resolve_target(root, path)
        exists = target.exists()
        policy.check(path, exists=exists, patch=patch)
        original = _read_text(target, path) if exists else ""
        new_text = _patched(path, original, patch)
        planned.append((target, path, new_text, original.encode() if exists else None))
    written: list[tuple[Path, bytes | None]] = []
    try:
        for target, _path, new_text, old_bytes in planned:
            written.append((target, old_bytes))
            if new_text is None:
                target.unlink()
            else:
                _write_atomically(target, new_text.encode("utf-8", "surrogatepass"))
    except OSError:
        for target, old_bytes in reversed(written):
            if old_bytes is None:
                target.unlink(missing_ok=True)
            else:
                _write_atomically(target, old_bytes)
        raise
    return [path for _target, path, _new, _old in planned]


def _write_atomically(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    mode = target.stat().st_mode & 0o7777 if target.exists() else 0o644
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".groundloop-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, target)  # replaces a path, never writes through a symlink
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------ SEARCH/REPLACE


_SEARCH = re.compile(r"^<{5,9} ?SEARCH\s*$")
_DIVIDER = re.compile(r"^={5,9}\s*$")
_REPLACE = re.compile(r"^>{5,9} ?REPLACE\s*$")


def _block_path(preceding: list[str]) -> str | None:
    for line in reversed(preceding):
        stripped = line.strip()
        if not stripped or stripped.startswith("```"):
            continue
        return stripped.strip("`*#: ").strip() or None
    return None


def _replace_once(text: str, search: list[str], replace: list[str], where: str) -> str:
    needle = "\n".join(search)
    hits = [m.start() for m in re.finditer(f"(?=(?:^|(?<=\n)){re.escape(needle)}(?:\n|$))", text)]
    if not hits:
        loose = [line.strip() for line in search]
        lines = [line.strip() for line in text.split("\n")]
        near = any(lines[k : k + len(loose)] == loose for k in range(len(lines)))
        hint = (
            " It matches only if indentation/whitespace is ignored: copy the lines exactly."
            if near
            else " Copy the SEARCH lines exactly from the current file."
        )
        raise PatchRejected(f"{where}: the SEARCH text is not in the file.{hint}")
    if len(hits) > 1:
        raise PatchRejected(
            f"{where}: the SEARCH text occurs {len(hits)} times; "
            "include more surrounding lines so it matches once"
        )
    start, end = hits[0], hits[0] + len(needle)
    if not replace:  # removing whole lines also removes their line break
        if end < len(text):
            end += 1
        elif start > 0:
            start -= 1
    return text[:start] + "\n".join(replace) + text[end:]


def search_replace_to_diff(files: dict[str, str], blocks_text: str) -> str:
    """Turn aider-style blocks into a unified diff against `files` (path -> text).

        path/to/file.py
        <<<<<<< SEARCH
        exact lines
        =======
        new lines
        >>>>>>> REPLACE

    Blocks apply in order (several may edit one file; a block with no path line reuses the
    previous one). An empty SEARCH creates a file that does not exist yet.
    """
    lines = blocks_text.split("\n")
    after = dict(files)
    touched: list[str] = []
    path: str | None = None
    i, start, count = 0, 0, 0
    while i < len(lines):
        if not _SEARCH.match(lines[i]):
            i += 1
            continue
        count += 1
        path = _block_path(lines[start:i]) or path
        if path is None:
            raise PatchRejected(f"SEARCH/REPLACE block {count} has no file path line before it")
        path = check_relative_path(path)
        try:
            divider = next(k for k in range(i + 1, len(lines)) if _DIVIDER.match(lines[k]))
            end = next(k for k in range(divider + 1, len(lines)) if _REPLACE.match(lines[k]))
        except StopIteration:
            raise PatchRejected(
                f"block {count} ({path}) is not closed by '=======' and '>>>>>>> REPLACE'"
            ) from None
        search, replace = lines[i + 1 : divider], lines[divider + 1 : end]
        where = f"block {count} ({path})"
        if path not in after:
            if any(s.strip() for s in search):
                raise PatchRejected(f"{where}: no such file; editable files: {sorted(files)}")
            after[path] = "\n".join(replace) + "\n" if replace else ""
        elif not any(s.strip() for s in search):
            raise PatchRejected(
                f"{where}: empty SEARCH on an existing file; quote the lines to replace"
            )
        else:
            after[path] = _replace_once(after[path], search, replace, where)
        touched.append(path)
        i, start = end + 1, end + 1
    if not count:
        raise PatchRejected("no '<<<<<<< SEARCH' block found")
    return make_diff({p: files[p] for p in touched if p in files}, {p: after[p] for p in touched})
