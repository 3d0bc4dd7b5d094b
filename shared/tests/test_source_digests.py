"""Digests of an environment's own folder are reused while its files are unchanged
(groundloop.execution.tree_digests._source_digest), and never hide a change: a rewritten
protected file is caught by verify_source, a new file changes the environment's digest, and a
workspace's digest is never taken from the cache. The file tree listing keeps its rules
(caches and bytecode out, symlinks listed and not followed, a top-level out/ ignored)."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

import pytest

from groundloop.execution import tree_digests
from groundloop.execution.environment import Environment, ProtectedFileChanged, tree_digest
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
