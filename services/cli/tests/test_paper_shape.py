"""The paper's released trajectory rows: `result` is an object keyed by metric name. Import
reads that shape (and a bare number), reports every row it skipped or could not score, and
export writes the same shape back."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path

import pytest

from groundloop import events as ev
from groundloop.cli.history import HistoryError, export_paper, import_paper
from groundloop.cli.history_commands import read_jsonl
from groundloop.execution.environment import Environment

AT = datetime(2025, 1, 1, tzinfo=UTC)
NANOGPT = Environment.load("nanogpt")
GRPO = Environment.load("grpo-math")


def diff(old: str, new: str, path: str = "train.py") -> str:
    return f"--- a/{path}\n+++ b/{path}\n@@ -1 +1 @@\n-{old}\n+{new}\n"


def row(epoch: int, idea: str, code_diff: str, result, env: str = "nanogpt", **more) -> dict:
    return {
        "ideator_model": "claude-3-5-sonnet",
        "executor_model": "gpt-4o",
        "env": env,
        "epoch": epoch,
        "idea": idea,
        "code_diff": code_diff,
        "result": result,
        **more,
    }


NANOGPT_ROWS = [
    row(0, "Rotary embeddings\n\nReplace learned positions with RoPE.", diff("a", "b"),
        {"val_loss": 3.2794}, run_id="r0"),  # fmt: skip
    row(0, "Bigger lr\n\nRaise the learning rate to 3e-3.", diff("lr=1", "lr=3"), 3.3012),
    row(1, "SwiGLU MLP", diff("gelu", "swiglu", "model.py"), {"val_loss": 3.251}),
    row(1, "Idea whose code never ran", "", None),  # imported: an idea with no patch
    row(1, "Diverged run", diff("x", "y"), {"val_loss": float("nan")}),  # imported, failed
    row(2, "Empty result object", diff("p", "q"), {}),  # imported, failed
    # skipped:
    row(2, "GRPO row in the wrong file", diff("k", "l"), {"accuracy": 0.52}),
    row(2, "", diff("m", "n"), {"val_loss": 3.3}),
    {k: v for k, v in row(2, "No epoch", diff("m", "n"), {"val_loss": 3.3}).items() if k != "epoch"},
    row(2, "Prose, not a diff", "I changed the optimizer to Muon.", {"val_loss": 3.2}),
    row(2, "Loss as text", diff("s", "t"), {"val_loss": "3.2"}),
    row(-1, "Negative epoch", diff("u", "v"), {"val_loss": 3.2}),
]  # fmt: skip


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # NaN as JSON's NaN token
    return path


def test_released_rows_import_with_a_report_and_export_in_the_same_shape(tmp_path) -> None:
    rows = read_jsonl(write_jsonl(tmp_path / "nanogpt.jsonl", NANOGPT_ROWS))
    imported = import_paper(rows, "paper-nanogpt", NANOGPT, occurred_at=AT)

    assert (imported.rows, imported.imported) == (12, 6)
    skipped = {n.row: n.reason for n in imported.skipped}
    assert sorted(skipped) == [7, 8, 9, 10, 11, 12]
    assert "not the environment's metric 'val_loss'" in skipped[7] and "accuracy" in skipped[7]
    assert "idea must be non-empty" in skipped[8]
    assert "missing field(s) epoch" in skipped[9]
    assert "not a readable unified diff" in skipped[10] or "no file section" in skipped[10]
    assert "result['val_loss'] must be a number" in skipped[11]
    assert "epoch must be a non-negative integer" in skipped[12]
    unscored = {n.row: n.reason for n in imported.unscored}
    assert sorted(unscored) == [4, 5, 6]
    assert "non-finite" in unscored[5] and "no result" in unscored[6]
    summary = imported.summary()
    assert summary.startswith(
        "12 rows read: 6 imported (3 with a score, 3 as failed runs), 6 skipped"
    )
    assert "skipped row 7: result has metric(s) accuracy" in summary

    runs = {
        e.idea_id: e for e in imported.events if isinstance(e, ev.RunCompleted)
    }  # one per imported row that was run
    ideas = [e for e in imported.events if isinstance(e, ev.IdeaProposed)]
    by_title = {i.title: runs.get(i.idea_id) for i in ideas}
    rope = by_title["Rotary embeddings"]
    assert rope is not None and rope.status == "succeeded" and rope.score == 3.2794
    assert rope.metrics == {"val_loss": 3.2794} and rope.reward == pytest.approx(1 / 3.2794)
    assert by_title["Bigger lr"].score == 3.3012  # type: ignore[union-attr]  # a bare number
    assert by_title["Idea whose code never ran"] is None
    diverged = by_title["Diverged run"]
    assert (
        diverged is not None
        and diverged.status == "failed"
        and "non-finite" in (diverged.reason or "")
    )
    completed = next(e for e in imported.events if isinstance(e, ev.SearchCompleted))
    assert completed.best_score == 3.251  # lowest loss: the environment's direction
    assert completed.totals.ideas == 6

    exported = export_paper(imported.events)
    assert [r["result"] for r in exported] == [
        {"val_loss": 3.2794},
        {"val_loss": 3.3012},  # the float row comes back in the released shape
        {"val_loss": 3.251},
        None,
        None,
        None,
    ]
    assert [r["idea"] for r in exported] == [r["idea"] for r in NANOGPT_ROWS[:6]]
    assert [r["code_diff"] for r in exported] == [r["code_diff"] for r in NANOGPT_ROWS[:6]]
    assert {(r["env"], r["ideator_model"], r["executor_model"]) for r in exported} == {
        ("nanogpt", "claude-3-5-sonnet", "gpt-4o")
    }
    # and the export imports again to the same log, with nothing skipped
    again = import_paper(exported, "paper-nanogpt", NANOGPT, occurred_at=AT)
    assert not again.skipped
    assert [e for e in again.events if isinstance(e, ev.RunCompleted) and e.score is not None] == [
        e for e in imported.events if isinstance(e, ev.RunCompleted) and e.score is not None
    ]


def test_accuracy_rows_round_trip_under_grpo_math(tmp_path) -> None:
    rows = [
        row(0, "KL penalty off", diff("kl=0.1", "kl=0"), {"accuracy": 0.52}, env="grpo-math"),
        row(0, "Group size 16", diff("g=8", "g=16"), {"accuracy": 0.561}, env="grpo-math"),
        row(1, "Loss on val", diff("a", "b"), {"val_loss": 3.1}, env="grpo-math"),
    ]
    imported = import_paper(
        read_jsonl(write_jsonl(tmp_path / "g.jsonl", rows)), "paper-grpo", GRPO, occurred_at=AT
    )
    assert [n.row for n in imported.skipped] == [3]
    completed = next(e for e in imported.events if isinstance(e, ev.SearchCompleted))
    assert completed.best_score == 0.561  # highest accuracy
    exported = export_paper(imported.events)
    assert [r["result"] for r in exported] == [{"accuracy": 0.52}, {"accuracy": 0.561}]
    assert all(r["env"] == "grpo-math" for r in exported)
    assert math.isclose(
        next(e.reward for e in imported.events if isinstance(e, ev.RunCompleted)), 0.52
    )


def test_nothing_importable_says_why() -> None:
    rows = [row(0, "x", diff("a", "b"), {"accuracy": 0.5})]
    with pytest.raises(HistoryError, match="no rows to import.*row 1: result has metric"):
        import_paper(rows, "imp", NANOGPT)
    # without an environment, an object result must name exactly one metric
    two = [row(0, "x", diff("a", "b"), {"val_loss": 3.2, "train_loss": 3.0})]
    with pytest.raises(HistoryError, match="names 2 metrics"):
        import_paper(two, "imp", None)
    one = import_paper([row(0, "x", diff("a", "b"), {"val_loss": 3.2})], "imp", None)
    assert [e.score for e in one.events if isinstance(e, ev.RunCompleted)] == [3.2]
