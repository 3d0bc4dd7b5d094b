"""The read API over projections in a real SQLite file, through FastAPI's TestClient."""

from __future__ import annotations

from datetime import datetime

import pytest
from fastapi.testclient import TestClient

from groundloop import events as ev
from groundloop.api.app import create_app
from groundloop.api.projector import project_all
from groundloop.api.store import make_engine, reset_tables
from groundloop.settings import Settings
from tests.search_story import search_story

S1 = search_story("s1")
S2 = search_story("s2", generations=2, ideas_per_generation=4, seed=5)
RUNNING = search_story("s3", generations=1, ideas_per_generation=3)[:-1]  # no SearchCompleted


@pytest.fixture
def client(tmp_path):
    settings = Settings(db_url=f"sqlite:///{tmp_path / 'api.db'}", data_dir=tmp_path)
    engine = make_engine(settings.resolved_db_url())
    reset_tables(engine)
    project_all(engine, S1 + S2 + RUNNING)
    with TestClient(create_app(settings)) as client:
        yield client
    engine.dispose()


def of_type(events, cls):
    return [e for e in events if isinstance(e, cls)]


def test_lists_searches_newest_first_with_status_filter(client):
    searches = client.get("/searches").json()
    assert {s["search_id"] for s in searches} == {"s1", "s2", "s3"}
    assert {s["search_id"]: s["status"] for s in searches}["s3"] == "running"
    started = [datetime.fromisoformat(s["started_at"]) for s in searches]
    assert started == sorted(started, reverse=True) and started[0].tzinfo is not None
    assert [
        s["search_id"] for s in client.get("/searches", params={"status": "running"}).json()
    ] == ["s3"]
    assert len(client.get("/searches", params={"limit": 1}).json()) == 1


def test_search_detail_counts_ideas_and_runs(client):
    detail = client.get("/searches/s1").json()
    assert (
        detail["search"]["environment"] == "tinygpt" and detail["search"]["status"] == "completed"
    )
    proposed = of_type(S1, ev.IdeaProposed)
    assert sum(detail["ideas_by_status"].values()) == len(proposed)
    assert detail["ideas_by_status"]["patch_failed"] == len(of_type(S1, ev.PatchFailed))
    completed = of_type(S1, ev.RunCompleted)
    assert detail["runs_by_status"] == {
        status: sum(1 for c in completed if c.status == status)
        for status in {c.status for c in completed}
    }
    assert [g["generation"] for g in detail["generations"]] == [0, 1, 2]
    spent = [*proposed, *of_type(S1, ev.PatchReady), *of_type(S1, ev.PatchFailed)]
    assert detail["cost_usd"] == pytest.approx(sum(e.usage.cost_usd for e in spent))
    patches = of_type(S1, ev.PatchReady)
    assert detail["input_tokens"] == sum(e.usage.input_tokens for e in proposed + patches)
    assert detail["output_tokens"] == sum(e.usage.output_tokens for e in proposed + patches)


def test_ideas_and_runs_of_a_search_filter_and_page(client):
    gen1 = client.get("/searches/s1/ideas", params={"generation": 1}).json()
    assert len(gen1) == 6 and {i["generation"] for i in gen1} == {1}
    everything = client.get("/searches/s1/ideas", params={"limit": 1000}).json()
    paged = [
        i
        for offset in range(0, len(everything), 5)
        for i in client.get("/searches/s1/ideas", params={"limit": 5, "offset": offset}).json()
    ]
    assert [i["idea_id"] for i in paged] == [i["idea_id"] for i in everything]
    baseline_runs = client.get("/searches/s1/runs", params={"purpose": "baseline"}).json()
    assert len(baseline_runs) == 2 and all(r["status"] == "succeeded" for r in baseline_runs)
    timed_out = client.get("/searches/s1/runs", params={"status": "timed_out"}).json()
    assert timed_out and all(r["error_tail"] and r["score"] is None for r in timed_out)
    assert len(client.get("/searches/s1/policies").json()) == 3
    assert len(client.get("/searches/s2/generations").json()) == 2


def test_leaderboard_ranks_ideas_by_mean_search_split_reward(client):
    board = client.get("/searches/s1/leaderboard", params={"limit": 100}).json()
    rewards: dict[str, list[float]] = {}
    scores: dict[str, list[float]] = {}
    for run in of_type(S1, ev.RunCompleted):
        if run.status == "succeeded" and run.purpose != "reeval":
            rewards.setdefault(run.idea_id, []).append(run.reward)
            scores.setdefault(run.idea_id, []).append(run.score)
    mean = {i: sum(r) / len(r) for i, r in rewards.items()}
    assert [e["idea_id"] for e in board] == sorted(mean, key=lambda i: (-mean[i], i))
    assert [e["rank"] for e in board] == list(range(1, len(mean) + 1))
    for e in board:
        assert e["split"] == "search" and e["runs"] == len(rewards[e["idea_id"]])
        assert e["mean_reward"] == pytest.approx(mean[e["idea_id"]])
        assert e["mean_score"] == pytest.approx(sum(scores[e["idea_id"]]) / e["runs"])
        assert e["best_reward"] == max(rewards[e["idea_id"]])
    # the story re-evaluates its best idea: on the final split, reported apart
    reeval = [r for r in of_type(S1, ev.RunCompleted) if r.purpose == "reeval" and r.idea_id]
    assert reeval
    judged = next(e for e in board if e["idea_id"] == reeval[0].idea_id)
    assert judged["final_runs"] == len(reeval) and judged["final_split"] == "final"
    assert judged["final_mean_score"] == pytest.approx(sum(r.score for r in reeval) / len(reeval))
    top = board[0]
    assert top["best_score"] == pytest.approx(
        1 / top["best_reward"], rel=1e-4
    )  # reward = 1/loss here
    without = client.get(
        "/searches/s1/leaderboard", params={"include_baseline": False, "limit": 100}
    ).json()
    assert len(without) == len(board) - 1 and all(e["mode"] != "baseline" for e in without)
    assert len(client.get("/searches/s1/leaderboard").json()) == min(20, len(board))


def test_lineage_follows_parents_breadth_first(client):
    ideas = {e.idea_id: e for e in of_type(S1, ev.IdeaProposed)}
    child = next(e for e in ideas.values() if e.generation == 2 and e.parent_ids)
    lineage = client.get(f"/ideas/{child.idea_id}/lineage").json()
    assert lineage["nodes"][0]["idea_id"] == child.idea_id and lineage["nodes"][0]["depth"] == 0
    expected, level, depth, seen = [], [child.idea_id], 0, {child.idea_id}
    while level:
        expected += [(i, depth) for i in level]
        following = []
        for i in level:
            for p in ideas[i].parent_ids:
                if p not in seen:
                    seen.add(p)
                    following.append(p)
        level, depth = following, depth + 1
    assert [(n["idea_id"], n["depth"]) for n in lineage["nodes"]] == expected
    assert max(d for _, d in expected) >= 1 and not lineage["truncated"]
    assert client.get(f"/ideas/{child.idea_id}/lineage", params={"max_depth": 0}).json()[
        "truncated"
    ]


def test_lineage_survives_cycles_and_unknown_parents(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'cycle.db'}")
    reset_tables(engine)
    start = S1[0]

    def idea(idea_id: str, parents: list[str]) -> ev.IdeaProposed:
        return start.derive(
            ev.IdeaProposed,
            "test",
            ord(idea_id),
            idea_id=idea_id,
            generation=1,
            mode="exploit",
            parent_ids=parents,
            title=idea_id,
            text="t",
            proposer=ev.ProposerInfo(kind="knobs"),
        )

    project_all(engine, [start, idea("a", ["b", "ghost"]), idea("b", ["a"])])
    with TestClient(create_app(engine=engine)) as client:
        nodes = client.get("/ideas/a/lineage").json()["nodes"]
    assert [(n["idea_id"], n["depth"], n["known"]) for n in nodes] == [
        ("a", 0, True),
        ("b", 1, True),
        ("ghost", 1, False),
    ]


def test_single_resources_and_404s(client):
    run = of_type(S1, ev.RunCompleted)[0]
    assert client.get(f"/runs/{run.run_id}").json()["provenance"]["python"] == "3.11.9"
    patch = of_type(S1, ev.PatchReady)[0]
    body = client.get(f"/patches/{patch.patch_id}").json()
    assert body["diff"] == patch.diff and body["preflight"]["passed"] is True
    assert client.get(f"/ideas/{patch.idea_id}").json()["patch_id"] == patch.patch_id
    for path in (
        "/searches/nope",
        "/searches/nope/ideas",
        "/searches/nope/leaderboard",
        "/ideas/nope",
        "/ideas/nope/lineage",
        "/runs/nope",
        "/patches/nope",
    ):
        response = client.get(path)
        assert response.status_code == 404 and "nope" in response.json()["detail"], path
    assert client.get("/searches", params={"limit": 0}).status_code == 422


def test_a_fresh_database_answers_with_empty_lists(tmp_path):
    settings = Settings(db_url=f"sqlite:///{tmp_path / 'new' / 'empty.db'}", data_dir=tmp_path)
    with TestClient(create_app(settings)) as client:
        assert client.get("/searches").json() == []
        assert client.get("/health").json()["status"] == "ok"
