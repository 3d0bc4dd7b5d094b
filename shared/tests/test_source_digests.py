"""Digests of an environment's own folder are reused while its files are unchanged
(groundloop.execution.tree_digests._source_digest), and never hide a change: a rewritten
protected file is caught by verify_source, a new file changes the environment's digest, and a
workspace's digest is never taken from the cache. The file tree listing keeps its rules
(caches and bytecode out, symlinks listed and not followed, a top-level out/ ignored). The
digest of a patched copy taken from memory (patched_tree_digest) is the materialised copy's,
byte for byte, in the real environments and in trees with symlinks, binaries and modes."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

import pytest

from groundloop.execution import tree_digests
from groundloop.execution.applier import make_diff
from groundloop.execution.environment import Environment, ProtectedFileChanged, tree_digest
from groundloop.execution.tree_digests import patched_tree_digest
from tests.paths import REPO_ROOT


@pytest.fixture
def env(tmp_path: Path, monkeypatch) -> Environment:
    # Every digest may be kept at once: the clock-tick guard is what this test steps around.
    monkeypatch.setattr(tree_digests, "RACY_NS", -(10**18))
    monkeypatch.setattr(tree_digests, "_source_digests", {})
    shutil.copytree(REPO_ROOT / "environments" / "synthetic", tmp_path / "synthetic",
                    ignore=shutil.ignore_patterns("__pycache__", "out"))  # fmt: skip
    return Environment.load(tmp_path / "synthetic")


def test_a_same_size_rewrite_of_a_protected_file_is_still_caught(env: Environment):
    env.verify_source()
    assert str(env.root / "run.py") in tree_digests._source_digests  # the cache is in use
    text = (env.root / "run.py").read_text()
    time.sleep(0.02)  # a later clock tick: the write gets a new ctime
    (env.root / "run.py").write_text(text.replace("NOISE = 0.001", "NOISE = 0.009"))
    assert len((env.root / "run.py").read_text()) == len(text)
    with pytest.raises(ProtectedFileChanged):
        env.verify_source()


def test_the_environment_digest_follows_its_files(env: Environment):
    first = env.digest()
    assert env.digest() == first
    (env.root / "notes.txt").write_text("new")
    second = env.digest()
    assert second != first
    os.utime(env.root / "notes.txt", ns=(0, 0))  # an mtime set back does not fool it
    (env.root / "notes.txt").write_text("NEW")
    os.utime(env.root / "notes.txt", ns=(0, 0))
    assert env.digest() not in (first, second)


def test_a_workspace_is_hashed_from_its_bytes(env: Environment, tmp_path: Path):
    made = env.materialize(tmp_path / "ws")
    assert made.patched_digest == env.digest()
    (tmp_path / "ws" / "config.py").write_text("changed")
    assert tree_digest(tmp_path / "ws") != made.patched_digest
    assert not [p for p in tree_digests._source_digests if p.startswith(str(tmp_path / "ws"))]


def test_the_tree_listing_keeps_its_rules(tmp_path: Path):
    root = tmp_path / "tree"
    for rel in ["a.py", "pkg/b.py", "pkg/c.pyc", "pkg/__pycache__/d.py", ".git/config",
                "out/model.bin", "pkg/out/kept.txt", ".pyc", "x.pyc/inside.py"]:  # fmt: skip
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(rel)
    (root / "link-to-pkg").symlink_to(root / "pkg", target_is_directory=True)
    (root / "dangling").symlink_to(root / "nowhere")
    assert tree_digests._tree_files(root) == sorted(
        [".pyc", "a.py", "dangling", "link-to-pkg", "pkg/b.py", "pkg/out/kept.txt"]
    )
    expected = hashlib.sha256()
    for rel in tree_digests._tree_files(root):
        path = root / rel
        data = b"symlink:" + os.readlink(path).encode() if path.is_symlink() else path.read_bytes()
        expected.update(f"{rel}\0{hashlib.sha256(data).hexdigest()}\n".encode())
    assert tree_digest(root) == expected.hexdigest()


# ------------------------------------------------------------ the digest of a patched copy

# Edits of an editable file: each must digest from memory exactly as its materialised copy.
EDITS = {
    "unicode line": lambda text: text + "# température — ünïcode ✓ 日本語\n",
    "trailing newline dropped": lambda text: text.rstrip("\n"),
    "trailing blank lines added": lambda text: text + "\n\n",
    "first line replaced": lambda text: "# edited\n" + text.split("\n", 1)[1],
    "emptied": lambda text: "",
}


@pytest.mark.parametrize("edit", sorted(EDITS))
@pytest.mark.parametrize("name", ["synthetic", "tinygrpo", "tinygpt", "grpo-math"])
def test_a_patched_copy_digests_from_memory_as_materialised(name: str, edit: str, tmp_path: Path):
    env = Environment.load(name, REPO_ROOT / "environments")
    before = env.editable_sources()
    after = {rel: EDITS[edit](text) for rel, text in before.items()}  # every editable file
    made = env.materialize(tmp_path / "ws", make_diff(before, after))
    assert made.files_changed == sorted(after)
    assert [(tmp_path / "ws" / rel).read_bytes() for rel in sorted(after)] == [
        after[rel].encode() for rel in sorted(after)
    ]
    assert patched_tree_digest(env.root, after) == made.patched_digest != env.digest()


def test_a_knob_change_digests_from_memory_as_materialised(tmp_path: Path):
    env = Environment.load("synthetic", REPO_ROOT / "environments")
    before = env.editable_sources()
    after = {"config.py": before["config.py"].replace("WIDTH = 32", "WIDTH = 128")}
    made = env.materialize(tmp_path / "ws", make_diff(before, after))
    assert patched_tree_digest(env.root, after) == made.patched_digest
    assert patched_tree_digest(env.root, {}) == env.digest()


def test_new_deleted_and_ignored_files_symlinks_binaries_and_modes(tmp_path: Path):
    root = tmp_path / "env"
    for rel in ["a.py", "pkg/b.py", "pkg/__pycache__/c.pyc", "out/model.bin", "run.sh"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(rel + "\n")
    (root / "run.sh").chmod(0o755)
    (root / "weights.bin").write_bytes(b"\0\xff\xfe binary")
    (root / "link").symlink_to("a.py")
    (root / "dangling").symlink_to("nowhere")
    changes: dict[str, str | None] = {
        "a.py": "é — edited, no newline",
        "pkg/b.py": None,  # deleted
        "pkg/new.py": "new in an old folder\n",
        "fresh/deep/c.txt": "new in new folders\r\n",
        "surrogate.txt": "lone \udcff surrogate",
        "out/log.txt": "run output: never part of the tree",
        "pkg/__pycache__/d.py": "a cache: never part of the tree",
        "pkg/out/kept.txt": "only a top-level out/ is left out",
    }
    copy = tmp_path / "copy"
    shutil.copytree(root, copy, symlinks=True)
    for rel, text in changes.items():
        if text is None:
            (copy / rel).unlink()
        else:
            (copy / rel).parent.mkdir(parents=True, exist_ok=True)
            (copy / rel).write_bytes(text.encode("utf-8", "surrogatepass"))  # as the applier
    assert os.access(copy / "run.sh", os.X_OK) and (copy / "link").is_symlink()
    assert patched_tree_digest(root, changes) == tree_digest(copy) != tree_digest(root)
    (copy / "run.sh").chmod(0o644)  # modes are no part of the digest, either way
    assert patched_tree_digest(root, changes) == tree_digest(copy)


def test_holds_text_only_for_a_regular_file_of_exactly_those_bytes(tmp_path: Path):
    (tmp_path / "lf.py").write_bytes("x = 'é'\n".encode())
    (tmp_path / "crlf.py").write_bytes(b"x = 1\r\n")
    (tmp_path / "link.py").symlink_to("lf.py")
    (tmp_path / "folder").mkdir()
    assert tree_digests.holds_text(tmp_path, "lf.py", "x = 'é'\n")
    assert not tree_digests.holds_text(tmp_path, "lf.py", "x = 'e'\n")
    assert (tmp_path / "crlf.py").read_text() == "x = 1\n"  # as the implementer reads it
    assert not tree_digests.holds_text(tmp_path, "crlf.py", "x = 1\n")
    assert not tree_digests.holds_text(tmp_path, "link.py", "x = 'é'\n")
    assert not tree_digests.holds_text(tmp_path, "missing.py", "")
    assert not tree_digests.holds_text(tmp_path, "folder", "")
