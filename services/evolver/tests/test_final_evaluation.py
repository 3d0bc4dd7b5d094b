"""The final re-evaluation: the top ideas and the baseline re-run on fresh seeds (on the
final split when the manifest has one), reported with a CI and a p-value.
"""

from __future__ import annotations

import pytest

from groundloop.events import (
    RunRequested,
    SearchCompleted,
)
from groundloop.evolver.stats import mean_ci, welch_t_test
from tests.evolver_world import (
    World,
    default_loss,
    manifest,
    search_started,
)

# ---------------------------------------------------------------------------- final re-evaluation


def test_final_re_evaluation_reports_ci_and_p_value() -> None:
    world = World(gpu_seconds=1.0).run(
        search_started(generations=2, ideas_per_generation=5, final_top_k=2, final_seeds=3)
    )
    state, done = world.state, world.completed()
    top_two = [idea_id for idea_id, _ in state.ranked_ideas()[:2]]
    reevals = [e for e in world.of(RunRequested) if e.purpose == "reeval"]
    assert sorted((r.idea_id, r.seed) for r in reevals) == sorted(
        (i, s) for i in top_two for s in (7, 8, 9)
    )
    assert all(r.diff == f"diff for {r.idea_id}\n" and r.patch_id for r in reevals)
    # Baseline on the final seeds: 7 and 8 exist from the start, only seed 9 is new.
    assert [r.seed for r in world.of(RunRequested) if r.purpose == "baseline"] == [7, 8, 9]
    baseline_scores = [default_loss(None, s) for s in (7, 8, 9)]
    assert done.baseline_score == pytest.approx(sum(baseline_scores) / 3)
    assert [f.idea_id for f in done.final] == top_two
    for evaluation in done.final:
        scores = [default_loss(evaluation.idea_id, s) for s in (7, 8, 9)]
        interval = mean_ci(scores)
        assert evaluation.scores == pytest.approx(scores)
        assert (evaluation.mean, evaluation.ci95_low, evaluation.ci95_high) == pytest.approx(
            (interval.mean, interval.low, interval.high)
        )
        assert evaluation.ci95_low < evaluation.mean < evaluation.ci95_high
        assert evaluation.p_value_vs_baseline == pytest.approx(
            welch_t_test(scores, baseline_scores).p_value
        )
    assert done.best_idea_id == top_two[0] and done.best_score == pytest.approx(done.final[0].mean)
    assert done.reason == "completed 2 generations"
    assert done.totals.ideas == 10 and done.totals.patches == 10
    assert done.totals.runs == 2 + 10 + 6 + 1 and done.totals.gpu_seconds == pytest.approx(19.0)
    assert len(world.of(SearchCompleted)) == 1
    assert world.tick().log[-1] == done  # nothing happens after the end


def test_final_baseline_runs_on_the_final_split_when_the_manifest_has_one() -> None:
    world = World(manifest_=manifest(final_split="test")).run(
        search_started(generations=1, ideas_per_generation=3, final_top_k=1, final_seeds=2)
    )
    unpatched = [r for r in world.of(RunRequested) if r.idea_id is None]
    assert [(r.purpose, r.seed) for r in unpatched] == [
        ("baseline", 7),
        ("baseline", 8),
        ("reeval", 7),
        ("reeval", 8),
    ]
    assert world.completed().final[0].p_value_vs_baseline is not None


def test_nothing_to_re_evaluate_still_completes() -> None:
    world = World(fail_patch=lambda idea_id: True).run(
        search_started(generations=2, ideas_per_generation=2)
    )
    done = world.completed()
    assert done.reason == "completed 2 generations; no idea produced a result to re-evaluate"
    assert (
        done.final == []
        and done.best_idea_id is None
        and done.baseline_score == pytest.approx(3.025)
    )
