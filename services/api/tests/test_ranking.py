"""groundloop.ranking (the one ranking every surface uses) and the ideas' folded columns it
feeds: means over succeeded search-split runs with their count, final re-evaluation runs
excluded, and the order right for metrics minimised and maximised."""

from __future__ import annotations

import random

import pytest
from sqlmodel import Session

from groundloop import events as ev
from groundloop import ranking
from groundloop.api import ranking as api_ranking
from groundloop.api.projector import project_all
from groundloop.api.store import IdeaRow, make_engine, reset_tables, table_snapshot
from groundloop.manifest import Metric
from groundloop.ranking import RunResult
from tests import factories as f
from tests.random_searches import random_search


def result(idea: str | None, score: float, *, purpose: str = "search", at: int = 0, **kw):
    reward = kw.pop("reward", score)
    return RunResult(idea, purpose, score, reward, at, kw.pop("run_id", f"{idea}-{at}"), **kw)


def test_an_idea_is_the_mean_of_its_search_split_runs_with_their_count():
    runs = [
        result("a", 6.0, at=1),
        result("a", 2.0, at=2),
        result("b", 5.0, at=3),
        result("b", 9.0, at=4, succeeded=False),  # a failed run's number never counts
        result("a", 100.0, purpose="reeval", at=5),  # nor does a final re-evaluation
    ]
    board = ranking.ranked(runs)
    assert [(s.idea_id, s.mean_score, s.runs) for s in board] == [("b", 5.0, 1), ("a", 4.0, 2)]
    a = board[1]
    assert (a.best_score, a.best_run_id) == (6.0, "a-1")


def test_a_reevaluation_alone_does_not_put_an_idea_on_the_board():
    assert ranking.ranked([result("a", 1.0, purpose="reeval")]) == []
    assert not ranking.on_search_split("reeval") and ranking.on_search_split("search")


@pytest.mark.parametrize(
    ("direction", "transform", "winner"),
    [("maximize", "x", "high"), ("minimize", "-x", "low"), ("minimize", "1/x", "low")],
)
def test_order_follows_the_metric_direction_through_its_reward(direction, transform, winner):
    metric = Metric(name="m", direction=direction, reward=transform)
    runs = [
        result(idea, score, reward=metric.to_reward(score), at=n)
        for n, (idea, score) in enumerate([("high", 4.0), ("low", 2.0), ("high", 3.0)])
    ]
    board = ranking.ranked(runs)
    assert board[0].idea_id == winner
    assert ranking.better(board[0].mean_score, board[1].mean_score, direction)


def test_best_so_far_follows_completion_order_and_ignores_the_final_split():
    runs = [
        result("c", 3.0, at=1),
        result("a", 5.0, at=2),
        result("b", 6.0, at=3),
        result("b", 2.0, at=4),  # b's mean falls to 4: the lead goes back to a
        result("c", 100.0, purpose="reeval", at=5),
        result(None, 9.0, purpose="baseline", at=6),
    ]
    random.Random(3).shuffle(runs)
    curve = ranking.best_so_far(runs)
    assert [(p.position, p.idea_id, p.mean_score) for p in curve] == [
        (1, "c", 3.0),
        (2, "a", 5.0),
        (3, "b", 6.0),
        (4, "a", 5.0),
    ]
    assert ranking.baseline(runs) == [9.0]


def test_means_do_not_depend_on_the_order_runs_arrive_in():
    scores = [0.1, 0.2, 0.3, 1e16, -1e16, 0.7]
    means = {ranking.mean(random.Random(seed).sample(scores, len(scores))) for seed in range(20)}
    assert len(means) == 1


def _story() -> list[ev.Event]:
    start = f.search_started("s1")
    a = f.idea_proposed("s1", 0, title="a")
    b = f.idea_proposed("s1", 1, title="b")
    return [
        start,
        a,
        b,
        f.run_result("s1", "a-1", score=6.0, idea_id=a.idea_id),
        f.run_result("s1", "a-2", score=2.0, idea_id=a.idea_id),
        f.run_result("s1", "b-1", score=5.0, idea_id=b.idea_id),
        f.run_result("s1", "b-final", score=100.0, idea_id=b.idea_id, purpose="reeval"),
        f.run_result("s1", "a-failed", status="failed", idea_id=a.idea_id),
    ]


def test_the_projection_folds_search_split_means_in_any_order():
    events = _story()
    snapshots = []
    for seed in range(4):
        shuffled = list(events)
        random.Random(seed).shuffle(shuffled)
        engine = make_engine("sqlite://")
        reset_tables(engine)
        project_all(engine, shuffled, batch_size=2)
        snapshots.append(table_snapshot(engine))
    assert all(s == snapshots[0] for s in snapshots)
    with Session(engine) as session:
        a = session.get(IdeaRow, events[1].idea_id)  # type: ignore[attr-defined]
        b = session.get(IdeaRow, events[2].idea_id)  # type: ignore[attr-defined]
    assert a is not None and b is not None
    assert (a.mean_score, a.search_runs, a.best_score, a.best_run_id) == (4.0, 2, 6.0, "a-1")
    assert (a.runs_completed, a.runs_succeeded) == (3, 2)
    # b's re-evaluation (100) is its best run overall, but not on the search split
    assert (b.mean_score, b.search_runs, b.best_score, b.best_run_id) == (5.0, 1, 5.0, "b-1")
    assert b.runs_succeeded == 2


# --- api.ranking.leader: the leaderboard's first line without loading every run ---


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_leader_is_the_leaderboards_first_line(direction, db_url):
    """On random searches (ties, failed and final runs, several seeds, many searches in the
    same tables): `leader` and `search_baseline_scores` equal what the whole leaderboard and
    every run give."""
    rng = random.Random(direction)
    searches = [f"s{n}" for n in range(60)]
    engine = make_engine(db_url)
    reset_tables(engine)
    project_all(engine, [e for s in searches for e in random_search(rng, s, direction)])
    leaders = set()
    with Session(engine) as session:
        for search_id in searches:
            for include_baseline in (True, False):
                board = api_ranking.leaderboard(
                    session, search_id, include_baseline=include_baseline
                )
                got = api_ranking.leader(session, search_id, include_baseline=include_baseline)
                want = board[0] if board else None
                assert _shown(got) == _shown(want)
                leaders.add(want and (want.idea.idea_id, want.standing))
            runs = api_ranking.search_runs(session, search_id)
            assert api_ranking.search_baseline_scores(
                session, search_id
            ) == api_ranking.baseline_scores(runs)
    engine.dispose()
    assert None in leaders and len(leaders) > 20  # the cases did vary


def _shown(entry: api_ranking.Entry | None) -> tuple | None:
    if entry is None:
        return None
    return (entry.rank, entry.idea.idea_id, entry.idea.title, entry.standing, entry.final)


def test_leader_breaks_ties_and_rounding_as_the_ranking_does(db_url):
    """Equal means go to the smaller idea id whatever order the runs came in; a mean the
    database would round differently (1e16 + 1 - 1e16) still ranks by ranking.mean."""
    ideas = [f.idea_proposed("s1", n, title=f"idea {n}") for n in range(3)]
    low, high, cancelling = sorted(ideas, key=lambda i: i.idea_id)

    def runs(idea: ev.IdeaProposed, scores: list[float]) -> list[ev.Event]:
        return [
            f.run_result("s1", f"{idea.idea_id}-{n}", score=s, idea_id=idea.idea_id)
            for n, s in enumerate(scores)
        ]

    tied = [*runs(high, [0.1, 0.2, 0.3]), *runs(low, [0.3, 0.2, 0.1])]
    engine = make_engine(db_url)
    reset_tables(engine)
    project_all(engine, [f.search_started("s1"), *ideas, *tied])
    with Session(engine) as session:
        leader = api_ranking.leader(session, "s1")
        assert leader is not None and leader.idea.idea_id == low.idea_id
    project_all(engine, runs(cancelling, [1e16, 1.0, -1e16]))
    with Session(engine) as session:
        leader = api_ranking.leader(session, "s1")
        assert leader is not None and leader.idea.idea_id == cancelling.idea_id
        assert leader.standing == api_ranking.leaderboard(session, "s1")[0].standing
    engine.dispose()
