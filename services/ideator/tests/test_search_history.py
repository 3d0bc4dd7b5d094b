"""The ideator's view of a search: runs folded into ideas by idea or patch, baseline apart."""

from __future__ import annotations

import pytest

from groundloop import events as ev
from groundloop.ideator.history import SearchHistory
from tests.factories import idea_proposed, patch_for, run_result, search_started


def test_history_folds_runs_by_idea_or_patch_and_keeps_baseline_apart():
    started = search_started("h", generations=1, ideas_per_generation=2)
    a, b = (idea_proposed("h", idea_id=i, title=i, text=i, knobs={"WIDTH": 64}) for i in ("a", "b"))
    patch = patch_for("h", 0, environment="synthetic", environment_digest="d", diff="")
    patch = patch.model_copy(update={"patch_id": "pb", "idea_id": "b"})

    def run(n: int, **fields) -> ev.RunCompleted:
        return run_result("h", f"r{n}", **fields)

    history = SearchHistory.from_events(
        "h",
        [
            started,
            a,
            b,
            patch,
            run(1, idea_id="a", score=0.7),
            run(2, patch_id="pb", status="timed_out"),
            run(3, purpose="baseline", score=0.6),
            run(4, idea_id="a", purpose="reeval", score=0.1),
            run(5, idea_id="a", score=0.9),
            ev.PatchFailed(
                search_id="other",
                producer="impl",
                idea_id="a",
                generation=0,
                attempts=1,
                stage="apply",
                last_error="x",
            ),
        ],
    )
    assert history.started == started and history.baseline_score == 0.6
    assert (
        history.ideas["a"].mean_score == pytest.approx(0.8)
        and history.ideas["a"].patch_error is None
    )
    assert history.ideas["b"].outcome == "run timed_out"
    assert [r.idea_id for r in history.above_baseline()] == ["a"]
