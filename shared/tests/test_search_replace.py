"""SEARCH/REPLACE blocks (the other patch format models write) turned into applicable diffs."""

from __future__ import annotations

import pytest

from groundloop.execution.applier import (
    PatchRejected,
    apply_to_sources,
    search_replace_to_diff,
)

# -------------------------------------------------------------------------- SEARCH/REPLACE


SOURCE = {"train.py": "import os\n\nLR = 1e-3\nSTEPS = 10\n\ndef main():\n    pass\n"}


def test_search_replace_blocks_become_an_applicable_diff():
    blocks = (
        "Here is the change.\n\ntrain.py\n```python\n<<<<<<< SEARCH\nLR = 1e-3\n=======\n"
        "LR = 3e-3\nWARMUP = 5\n>>>>>>> REPLACE\n```\n\n"
        "<<<<<<< SEARCH\n    pass\n=======\n    run()\n>>>>>>> REPLACE\n"
        "models/new.py\n<<<<<<< SEARCH\n=======\nX = 1\n>>>>>>> REPLACE\n"
    )
    diff = search_replace_to_diff(SOURCE, blocks)
    changed = apply_to_sources(SOURCE, diff, new_files=["models/*.py"])
    assert changed["train.py"] == SOURCE["train.py"].replace(
        "LR = 1e-3\n", "LR = 3e-3\nWARMUP = 5\n"
    ).replace("pass", "run()")
    assert changed["models/new.py"] == "X = 1\n"


def test_search_replace_deleting_lines():
    blocks = "train.py\n<<<<<<< SEARCH\nSTEPS = 10\n=======\n>>>>>>> REPLACE\n"
    diff = search_replace_to_diff(SOURCE, blocks)
    assert apply_to_sources(SOURCE, diff)["train.py"] == SOURCE["train.py"].replace(
        "STEPS = 10\n", ""
    )


@pytest.mark.parametrize(
    "blocks,match",
    [
        ("train.py\n<<<<<<< SEARCH\nLR = 1\n=======\nLR = 2\n>>>>>>> REPLACE\n", "not in the file"),
        (
            "train.py\n<<<<<<< SEARCH\n  LR = 1e-3\n=======\nLR = 2\n>>>>>>> REPLACE\n",
            "whitespace is ignored",
        ),
        ("train.py\n<<<<<<< SEARCH\n\n=======\nx\n>>>>>>> REPLACE\n", "empty SEARCH"),
        ("train.py\n<<<<<<< SEARCH\nLR = 1e-3\n=======\nLR = 2\n", "not closed"),
        ("<<<<<<< SEARCH\nLR = 1e-3\n=======\nLR = 2\n>>>>>>> REPLACE\n", "no file path"),
        ("../evil.py\n<<<<<<< SEARCH\n=======\nx\n>>>>>>> REPLACE\n", r"'\.\.'"),
        ("just prose, no blocks", "no '<<<<<<< SEARCH'"),
    ],
)
def test_search_replace_errors(blocks, match):
    with pytest.raises(PatchRejected, match=match):
        search_replace_to_diff(SOURCE, blocks)


def test_search_replace_requires_a_unique_match():
    files = {"f.py": "x = 1\ny = 2\nx = 1\n"}
    with pytest.raises(PatchRejected, match="occurs 2 times"):
        search_replace_to_diff(
            files, "f.py\n<<<<<<< SEARCH\nx = 1\n=======\nx = 5\n>>>>>>> REPLACE\n"
        )
    # a partial line is not a match: SEARCH matches whole lines only
    with pytest.raises(PatchRejected, match="not in the file"):
        search_replace_to_diff(files, "f.py\n<<<<<<< SEARCH\ny = \n=======\nx\n>>>>>>> REPLACE\n")
