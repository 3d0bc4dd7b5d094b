"""The strict applier's round trips and fuzzing (property tests): make_diff then apply gives
the edited files back, in memory and on disk; malformed or arbitrary text raises only
PatchRejected, never another exception.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from groundloop.execution.applier import (
    PatchRejected,
    apply_diff,
    apply_to_sources,
    make_diff,
)

# Lines chosen to collide: repeats (ambiguous context), trailing whitespace, CR, and lines
# that look like diff syntax once prefixed.
TRICKY_LINES = [
    "a",
    "b",
    "",
    "x = 1",
    "x = 1   ",
    "def f():",
    "    return 2",
    "\tz",
    "crlf\r",
    "--- a/x",
    "+++ b/x",
    "-- y",
    "++ z",
    "@@ -1 +1 @@",
    "\\ No newline at end of file",
    "diff --git a/x b/x",
    " leading",
    "form\x0cfeed",
    "sep\u2028line",
]
line = st.one_of(
    st.sampled_from(TRICKY_LINES),
    st.text(
        st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\x00"), max_size=12
    ),
)


@st.composite
def texts(draw: st.DrawFn) -> str:
    lines = draw(st.lists(line, max_size=25))
    text = "\n".join(lines)
    return text + "\n" if lines and draw(st.booleans()) else text


@st.composite
def edited(draw: st.DrawFn, text: str) -> str:
    """`text` after a few random line insertions, deletions and replacements."""
    lines = text.split("\n")
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["insert", "delete", "replace"]))
        k = draw(st.integers(0, len(lines)))
        if op == "insert":
            lines.insert(k, draw(line))
        elif lines and k < len(lines):
            if op == "delete":
                del lines[k]
            else:
                lines[k] = draw(line)
    return "\n".join(lines)


@st.composite
def file_sets(draw: st.DrawFn) -> tuple[dict[str, str], dict[str, str]]:
    names = draw(
        st.lists(
            st.sampled_from(["a.py", "b.txt", "pkg/c.py", "d e.py"]),
            min_size=1,
            max_size=4,
            unique=True,
        )
    )
    before: dict[str, str] = {}
    after: dict[str, str] = {}
    for name in names:
        kind = draw(st.sampled_from(["edit", "edit", "create", "delete"]))
        if kind != "create":
            before[name] = draw(texts())
        if kind != "delete":
            after[name] = draw(edited(before.get(name, draw(texts()))))
    return before, after


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


@settings(max_examples=300, deadline=None, database=None)
@given(file_sets())
def test_make_diff_then_apply_in_memory_round_trips(pair):
    before, after = pair
    diff = make_diff(before, after)
    changed = apply_to_sources(before, diff, new_files=["**"])
    result = {**before, **changed}
    assert {k: v for k, v in result.items() if v is not None} == after


@settings(max_examples=60, deadline=None, database=None)
@given(file_sets())
def test_make_diff_then_apply_on_disk_round_trips_without_stray_files(pair):
    before, after = pair
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_tree(root, before)
        changed = apply_diff(
            root, make_diff(before, after), editable=list(before), new_files=["**"]
        )
        assert sorted(changed) == sorted(
            p for p in set(before) | set(after) if before.get(p) != after.get(p)
        )
        # the tree is exactly `after`: no .orig, .rej or temporary files left behind
        assert read_tree(root) == {k: v.encode() for k, v in after.items()}


def _valid_diff() -> str:
    before = {"m.py": "".join(f"line {i}\n" for i in range(30))}
    after = {"m.py": before["m.py"].replace("line 3\n", "LINE 3\nextra\n").replace("line 20\n", "")}
    return make_diff(before, after)


@settings(max_examples=200, deadline=None, database=None)
@given(st.data())
def test_wrong_hunk_counts_are_rejected(data):
    lines = _valid_diff().split("\n")
    headers = [k for k, text in enumerate(lines) if text.startswith("@@")]
    k = data.draw(st.sampled_from(headers))

    numbers = [int(n) for n in re.findall(r"\d+", lines[k])]
    which = data.draw(st.sampled_from([1, 3]))  # an old or a new count
    numbers[which] = data.draw(st.integers(0, 40).filter(lambda n, w=which: n != numbers[w]))
    lines[k] = f"@@ -{numbers[0]},{numbers[1]} +{numbers[2]},{numbers[3]} @@"
    source = {"m.py": "".join(f"line {i}\n" for i in range(30))}
    with pytest.raises(PatchRejected, match="header promises|outside any hunk"):
        apply_to_sources(source, "\n".join(lines))


@settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(st.data())
def test_mangled_diffs_raise_only_patch_rejected(data):
    lines = _valid_diff().split("\n")
    for _ in range(data.draw(st.integers(1, 4))):
        k = data.draw(st.integers(0, len(lines) - 1))
        op = data.draw(st.sampled_from(["drop", "dup", "retag", "junk", "number"]))
        if op == "drop":
            del lines[k]
        elif op == "dup":
            lines.insert(k, lines[k])
        elif op == "retag":
            lines[k] = (
                data.draw(st.sampled_from(["+", "-", " ", "@", "\\", "x", ""])) + lines[k][1:]
            )
        elif op == "junk":
            lines.insert(k, data.draw(st.text(max_size=30)))
        else:
            lines[k] = lines[k].replace("1", data.draw(st.sampled_from(["0", "99", "-1", ""])))
        if not lines:
            break
    source = {"m.py": "".join(f"line {i}\n" for i in range(30))}
    try:
        apply_to_sources(source, "\n".join(lines))
    except PatchRejected as exc:
        assert exc.reason


@settings(max_examples=300, deadline=None, database=None)
@given(st.text(max_size=400))
def test_arbitrary_text_raises_only_patch_rejected(text):
    try:
        apply_to_sources({"m.py": "a\nb\n"}, text)
    except PatchRejected as exc:
        assert exc.reason
