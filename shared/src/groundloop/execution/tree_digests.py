"""Digests of file trees: an environment's folder (its digest, its protected files) and a
run's workspace (what was run, and whether a run changed code). Part of the run protocol
(`groundloop.execution.run_protocol`, which re-exports these names), kept apart so each reads
in one sitting.

`tree_digest` is sha256 over every file's relative path and bytes, caches and bytecode left
out (and everything in a top-level out/: run outputs are not code); symlinks are hashed by
where they point, never followed. `patched_tree_digest` is the same digest of an environment's
copy with some files rewritten, taken without making the copy.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Mapping
from pathlib import Path

_IGNORED_DIRS = {"__pycache__", ".git", ".pytest_cache"}
_TOP_LEVEL_IGNORED = {"out"}  # run outputs (checkpoints, logs) are not part of the code


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _ignored(name: str) -> bool:
    """Whether a file or folder of this name is left out of trees (caches, bytecode)."""
    return name in _IGNORED_DIRS or (name.endswith(".pyc") and len(name) > len(".pyc"))


def _listed(rel: str) -> bool:
    """Whether `_tree_files` lists a file at this relative path (none of its folders a cache,
    nor under a top-level out/)."""
    parts = rel.split("/")
    return not any(_ignored(part) for part in parts) and not (
        len(parts) > 1 and parts[0] in _TOP_LEVEL_IGNORED
    )


def _tree_files(root: Path) -> list[str]:
    """Relative posix paths of every file and symlink under `root`, sorted, minus caches
    (and everything in a top-level out/). Symlinks are listed, never followed."""
    found: list[str] = []
    folders = [("", os.fspath(root))]
    while folders:
        prefix, folder = folders.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:  # unreadable or gone: skipped, as os.walk does
            continue
        for entry in entries:
            try:
                is_folder = entry.is_dir() and not entry.is_symlink()
            except OSError:
                is_folder = False
            if is_folder:
                if not (_ignored(entry.name) or (not prefix and entry.name in _TOP_LEVEL_IGNORED)):
                    folders.append((f"{prefix}{entry.name}/", entry.path))
            elif not _ignored(entry.name):
                found.append(prefix + entry.name)
    return sorted(found)


def _file_digest(path: Path | str) -> str:
    if os.path.islink(path):  # hash where it points, never what it points to
        return hashlib.sha256(b"symlink:" + os.readlink(path).encode()).hexdigest()
    with open(path, "rb") as file:
        return hashlib.sha256(file.read()).hexdigest()


# An environment's source files are hashed on every run (checked before and after it, named in
# its provenance); they change rarely. A digest is reused while the file's inode, size, mtime
# and ctime stay the same: any write changes its ctime, which no caller can set back. One made
# within RACY_NS of the file's last change is not kept (a second write in the same clock tick
# could leave its ctime unchanged).
_source_digests: dict[str, tuple[tuple[int, int, int, int, int], str]] = {}
RACY_NS = 2_000_000_000


def _source_digest(path: str) -> str:
    stat = os.lstat(path)
    key = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    known = _source_digests.get(path)
    if known is not None and known[0] == key:
        return known[1]
    digest = _file_digest(path)
    if time.time_ns() - stat.st_ctime_ns > RACY_NS:
        if len(_source_digests) > 100_000:  # many environments, reloaded often: start over
            _source_digests.clear()
        _source_digests[path] = (key, digest)
    return digest


def _digest_of(
    root: Path, rels: list[str], *, source: bool = False, known: Mapping[str, str] | None = None
) -> str:
    """sha256 over `rels` under `root`; `source`: an environment's own folder, whose file
    digests may be reused while the files are unchanged (never a workspace a run wrote);
    `known`: file digests by relative path that stand in for the files under `root`."""
    digest = _source_digest if source else _file_digest
    known = known or {}
    total = hashlib.sha256()
    base = os.fspath(root)
    for rel in rels:
        file_digest = known.get(rel) or digest(os.path.join(base, rel))
        total.update(rel.encode() + b"\0" + file_digest.encode() + b"\n")
    return total.hexdigest()


def tree_digest(root: Path, *, source: bool = False) -> str:
    """sha256 over every file's relative path and bytes (caches and top-level out/ ignored)."""
    return _digest_of(root, _tree_files(root), source=source)


def patched_tree_digest(root: Path, changed: Mapping[str, str | None]) -> str:
    """`tree_digest` of a copy of the environment folder `root` in which each path of `changed`
    was written with its text as UTF-8 (as the applier writes it) or deleted (None), taken
    without making the copy: the other files are hashed from `root` (symlinks, binary files and
    all), modes are no part of the digest either way. The caller vouches that writing
    `changed` into a copy would succeed (see `holds_text`)."""
    rels = set(_tree_files(root))
    written: dict[str, str] = {}
    for rel, text in changed.items():
        if text is None:
            rels.discard(rel)
        elif _listed(rel):
            rels.add(rel)
            written[rel] = text_digest(text)
    return _digest_of(root, sorted(rels), source=True, known=written)


def holds_text(root: Path, rel: str, text: str) -> bool:
    """Whether `root`/`rel` is a regular file whose bytes are exactly `text` in UTF-8 (so a
    patch applied to `text` in memory is what applying it to the file would give). Uses the
    source-digest cache: `root` is an environment's own folder."""
    try:
        return _source_digest(os.path.join(os.fspath(root), rel)) == text_digest(text)
    except OSError:
        return False
