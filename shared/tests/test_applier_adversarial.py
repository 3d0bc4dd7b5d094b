"""The strict applier against adversarial and awkward diffs: escaping paths, symlinks,
protected files, huge or binary patches, renames; fuzzy hunk placement and exact bytes kept.

Every rejection must be PatchRejected, must write nothing, and must never touch anything
outside the workspace.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from groundloop.execution.applier import (
    PatchRejected,
    apply_diff,
    apply_to_sources,
    parse_diff,
)


def write_tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(text.encode())


def read_tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# ------------------------------------------------------------------------- adversarial


@pytest.fixture
def layout(tmp_path: Path):
    """A workspace and, beside it, an `outside` folder that must never change."""
    ws, outside = tmp_path / "ws", tmp_path / "outside"
    write_tree(
        ws,
        {"train.py": "lr = 1\nsteps = 2\n", "evaluate.py": "score()\n", "sub/util.py": "u = 1\n"},
    )
    write_tree(outside, {"secret.py": "KEY = 1\n"})
    snapshot = {"ws": read_tree(ws), "outside": read_tree(outside)}
    yield ws, outside
    assert read_tree(outside) == snapshot["outside"], "something outside the workspace changed"


def rejected(ws: Path, diff: str, match: str, **kwargs) -> None:
    before = read_tree(ws)
    kwargs.setdefault("editable", ["train.py", "sub/util.py"])
    with pytest.raises(PatchRejected, match=match):
        apply_diff(ws, diff, **kwargs)
    assert read_tree(ws) == before, "a rejected diff wrote something"


def new_file_diff(path: str, text: str = "evil = 1\n") -> str:
    return f"--- /dev/null\n+++ {path}\n@@ -0,0 +1 @@\n+{text}"


def edit_diff(path: str, old: str = "lr = 1", new: str = "lr = 2") -> str:
    return f"--- a/{path}\n+++ b/{path}\n@@ -1 +1 @@\n-{old}\n+{new}\n"


def test_parent_directory_paths_are_rejected(layout):
    ws, _ = layout
    rejected(ws, edit_diff("../outside/secret.py", "KEY = 1", "KEY = 2"), r"'\.\.'")
    rejected(ws, new_file_diff("b/../../outside/new.py"), r"'\.\.'", new_files=["**"])
    rejected(ws, edit_diff("sub/../../outside/secret.py", "KEY = 1"), r"'\.\.'")


def test_absolute_paths_are_rejected(layout):
    ws, outside = layout
    target = outside / "secret.py"
    diff = f"--- {target}\n+++ {target}\n@@ -1 +1 @@\n-KEY = 1\n+KEY = 2\n"
    rejected(ws, diff, "absolute", editable=[str(target)])
    rejected(ws, new_file_diff(str(outside / "planted.py")), "absolute", new_files=["**"])


def test_symlinks_are_never_followed(layout):
    ws, outside = layout
    (ws / "link").symlink_to(outside, target_is_directory=True)
    (ws / "cfg.py").symlink_to(outside / "secret.py")
    rejected(ws, new_file_diff("b/link/planted.py"), "symlink", new_files=["**"])
    rejected(ws, edit_diff("link/secret.py", "KEY = 1"), "symlink", editable=["link/secret.py"])
    rejected(ws, edit_diff("cfg.py", "KEY = 1"), "symlink", editable=["cfg.py"])
    assert not (outside / "planted.py").exists()


def test_protected_and_non_editable_files_are_rejected(layout):
    ws, _ = layout
    rejected(
        ws,
        edit_diff("evaluate.py", "score()", "print(1.0)"),
        "protected",
        protected=["evaluate.py"],
    )
    rejected(ws, edit_diff("evaluate.py", "score()", "print(1.0)"), "not editable")
    deletion = "--- a/evaluate.py\n+++ /dev/null\n@@ -1 +0,0 @@\n-score()\n"
    rejected(ws, deletion, "not editable")
    rejected(
        ws, new_file_diff("b/evaluate.py"), "protected", new_files=["**"], protected=["evaluate.py"]
    )


def test_a_ten_megabyte_diff_is_rejected_unread(layout):
    ws, _ = layout
    huge = "--- a/train.py\n+++ b/train.py\n@@ -1 +1,200000 @@\n-lr = 1\n"
    huge += "".join(f"+{'y' * 48}\n" for _ in range(200_000))
    assert len(huge) > 10_000_000
    rejected(ws, huge, "larger than")


@pytest.mark.parametrize(
    "junk",
    [
        "diff --git a/train.py b/train.py\nGIT binary patch\nliteral 12\nzcmZ?wbhEHbW&i\n",
        "diff --git a/train.py b/train.py\nBinary files a/train.py and b/train.py differ\n",
        "--- a/train.py\n+++ b/train.py\n@@ -1 +1 @@\n-lr = 1\n+lr = \x00\x01\x02\n",
    ],
)
def test_binary_patches_are_rejected(layout, junk):
    ws, _ = layout
    rejected(ws, junk, "binary|NUL")


def test_binary_target_files_are_rejected(layout):
    ws, _ = layout
    (ws / "train.py").write_bytes(b"lr = 1\n\x00\xff")
    rejected(ws, edit_diff("train.py"), "binary")


def test_all_or_nothing_when_a_later_file_fails(layout):
    ws, _ = layout
    diff = edit_diff("train.py") + edit_diff("sub/util.py", "u = 999", "u = 2")
    rejected(ws, diff, "does not match")


def test_renames_and_mode_changes_are_rejected(layout):
    ws, _ = layout
    rejected(
        ws,
        "diff --git a/train.py b/t2.py\nsimilarity index 100%\nrename from train.py\n"
        "rename to t2.py\n",
        "renames",
    )
    rejected(
        ws, "diff --git a/train.py b/train.py\nold mode 100644\nnew mode 100755\n", "mode changes"
    )
    rejected(ws, "--- a/train.py\n+++ b/other.py\n@@ -1 +1 @@\n-lr = 1\n+lr = 2\n", "renaming")


def test_hunk_found_elsewhere_applies_without_leaving_backup_files(layout):
    ws, _ = layout
    # stated at line 40, really at line 2: a unique match is taken, and no .orig is written
    diff = "--- train.py\n+++ train.py\n@@ -40,1 +40,1 @@\n-steps = 2\n+steps = 3\n"
    assert apply_diff(ws, diff, editable=["train.py"]) == ["train.py"]
    assert (ws / "train.py").read_text() == "lr = 1\nsteps = 3\n"
    assert sorted(p.name for p in ws.iterdir()) == ["evaluate.py", "sub", "train.py"]


def test_ambiguous_context_needs_the_right_line_number(tmp_path):
    text = "x = 0\nif a:\n    go()\nmid\nif a:\n    go()\nend\n"
    (tmp_path / "f.py").write_text(text)
    hunk = "if a:\n-    go()\n+    stop()\n"
    ambiguous = f"--- f.py\n+++ f.py\n@@ -10,2 +10,2 @@\n {hunk}"
    with pytest.raises(PatchRejected, match="occurs 2 times"):
        apply_diff(tmp_path, ambiguous, editable=["f.py"])
    pinned = f"--- f.py\n+++ f.py\n@@ -5,2 +5,2 @@\n {hunk}"
    apply_diff(tmp_path, pinned, editable=["f.py"])
    assert (tmp_path / "f.py").read_text() == text.replace(
        "mid\nif a:\n    go()", "mid\nif a:\n    stop()"
    )


def test_hunks_apply_in_order(tmp_path):
    (tmp_path / "f.py").write_text("a\nb\nc\nd\n")
    backwards = "--- f.py\n+++ f.py\n@@ -4 +4 @@\n-d\n+D\n@@ -1 +1 @@\n-a\n+A\n"
    with pytest.raises(PatchRejected, match="hunk 2"):
        apply_diff(tmp_path, backwards, editable=["f.py"])


def test_trailing_whitespace_is_tolerated_and_the_file_keeps_its_bytes(tmp_path):
    (tmp_path / "f.py").write_bytes(b"a = 1   \r\nb = 2\r\nc = 3\r\n")
    diff = "--- f.py\n+++ f.py\n@@ -1,3 +1,3 @@\n a = 1\n-b = 2\n+b = 20\r\n c = 3\n"
    apply_diff(tmp_path, diff, editable=["f.py"])
    assert (tmp_path / "f.py").read_bytes() == b"a = 1   \r\nb = 20\r\nc = 3\r\n"
    leading = "--- f.py\n+++ f.py\n@@ -1 +1 @@\n-  a = 1\n+a = 2\n"
    with pytest.raises(PatchRejected, match="should be"):
        apply_diff(tmp_path, leading, editable=["f.py"])


def test_no_newline_at_end_of_file(tmp_path):
    (tmp_path / "f.py").write_text("a\nb")
    marked = "--- f.py\n+++ f.py\n@@ -2 +2,2 @@\n-b\n\\ No newline at end of file\n+b\n+c\n"
    apply_diff(tmp_path, marked, editable=["f.py"])
    assert (tmp_path / "f.py").read_text() == "a\nb\nc\n"
    # an LLM that forgets the marker still cannot glue two lines together
    (tmp_path / "g.py").write_text("a\nb")
    unmarked = "--- g.py\n+++ g.py\n@@ -1,2 +1,3 @@\n a\n b\n+c\n"
    apply_diff(tmp_path, unmarked, editable=["g.py"])
    assert (tmp_path / "g.py").read_text() == "a\nb\nc\n"


def test_blank_context_lines_without_their_space_are_accepted(tmp_path):
    (tmp_path / "f.py").write_text("a\n\nb\n")
    diff = "--- a/f.py\n+++ b/f.py\n@@ -1,3 +1,3 @@\n a\n\n-b\n+B\n"
    apply_diff(tmp_path, diff, editable=["f.py"])
    assert (tmp_path / "f.py").read_text() == "a\n\nB\n"


def test_new_and_deleted_files(layout):
    ws, _ = layout
    rejected(ws, new_file_diff("b/notes.md"), "not allowed", new_files=["models/*.py"])
    rejected(ws, new_file_diff("b/models/deep/x.py"), "not allowed", new_files=["models/*.py"])
    rejected(ws, new_file_diff("b/train.py"), "already exists", new_files=["*.py"])
    partial = "--- a/train.py\n+++ /dev/null\n@@ -1 +0,0 @@\n-lr = 1\n"
    rejected(ws, partial, "do not remove every line")
    apply_diff(ws, new_file_diff("b/models/x.py"), editable=[], new_files=["models/*.py"])
    assert (ws / "models/x.py").read_text() == "evil = 1\n"
    deletion = "--- a/sub/util.py\n+++ /dev/null\n@@ -1 +0,0 @@\n-u = 1\n"
    assert apply_diff(ws, deletion, editable=["sub/util.py"]) == ["sub/util.py"]
    assert not (ws / "sub/util.py").exists()


def test_diff_structure_errors_are_rejected():
    for diff, match in [
        ("@@ -1 +1 @@\n-a\n+b\n", "before any"),
        (
            "--- a/x\n+++ b/x\n@@ -1 +1 @@\n-a\n+b\n--- a/x\n+++ b/x\n@@ -2 +2 @@\n-b\n+c\n",
            "appears twice",
        ),
        ("--- a/x\n+++ b/x\n@@ -1 +1 @@\n-a\n+b\n+c\n", "outside any hunk"),
        ("--- a/x\n+++ b/x\n@@ -1,3 +1 @@\n-a\n+b\n", "ends inside the hunk"),
        ("--- a/x\n+++ b/x\n@@ -one +1 @@\n-a\n+b\n", "malformed hunk header"),
        ("--- a/x\n+++ b/x\n", "no @@ hunks"),
        ('--- "a/x y"\n+++ "b/x y"\n@@ -1 +1 @@\n-a\n+b\n', "quoted"),
    ]:
        with pytest.raises(PatchRejected, match=match):
            parse_diff(diff)


def test_rejections_are_value_errors_with_a_reason():
    with pytest.raises(ValueError) as info:
        apply_to_sources({"x": "a\n"}, "--- a/x\n+++ b/x\n@@ -1 +1 @@\n-zzz\n+b\n")
    assert "does not match" in info.value.reason and "copy it from the file" in info.value.reason


def test_file_mode_is_kept(tmp_path):
    script = tmp_path / "run.sh"
    script.write_text("echo 1\n")
    os.chmod(script, 0o755)
    apply_diff(tmp_path, edit_diff("run.sh", "echo 1", "echo 2"), editable=["run.sh"])
    assert script.stat().st_mode & 0o777 == 0o755 and script.read_text() == "echo 2\n"
