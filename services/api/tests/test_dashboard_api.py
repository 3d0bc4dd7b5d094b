"""The dashboard's JSON routes, its static files, the live feed and run logs: projections of
a realistic search in a real SQLite file; the live feed and the object store on a real
nats-server with the real projector, served by real uvicorn (groundloop.api.serve)."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from groundloop import events as ev
from groundloop.api import service
from groundloop.api.app import STATIC, create_app
from groundloop.api.projector import project_all
from groundloop.api.serve import DashboardError, start_dashboard
from groundloop.api.store import make_engine, reset_tables
from groundloop.bus import Bus
from groundloop.settings import Settings
from tests.search_story import search_story

S1 = search_story("s1")


@pytest.fixture
def client(tmp_path):
    settings = Settings(db_url=f"sqlite:///{tmp_path / 'api.db'}", data_dir=tmp_path)
    engine = make_engine(settings.resolved_db_url())
    reset_tables(engine)
    project_all(engine, S1)
    with TestClient(create_app(settings)) as client:
        yield client
    engine.dispose()


def of_type(events, cls):
    return [e for e in events if isinstance(e, cls)]


def test_the_page_and_its_modules_are_served_and_need_nothing_from_the_network(client):
    page = client.get("/")
    assert page.status_code == 200 and '<script type="module" src="/static/app.js">' in page.text
    files = [p for p in STATIC.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} <= {".html", ".js", ".css"}
    for path in files:
        text = path.read_text()
        # offline: nothing fetched from another origin (no CDN, no web font)
        assert not re.search(r"(src|href)=[\"']?(https?:)?//", text), path
        assert not re.search(r"@import|url\(\s*[\"']?https?:", text), path
        served = client.get(f"/static/{path.relative_to(STATIC).as_posix()}")
        assert served.status_code == 200 and served.text == text
    for module in STATIC.rglob("*.js"):  # every relative import resolves to a served file
        for target in re.findall(r'from "(\.{1,2}/[^"]+)"', module.read_text()):
            assert (module.parent / target).resolve().is_file(), f"{module}: {target}"


def test_search_summaries_count_what_the_log_says(client):
    (row,) = client.get("/dashboard/searches").json()
    completed = of_type(S1, ev.RunCompleted)
    assert row["search_id"] == "s1" and row["status"] == "completed"
    assert row["ideas"] == sum(1 for e in of_type(S1, ev.IdeaProposed) if e.mode != "baseline")
    assert row["runs_succeeded"] == sum(1 for c in completed if c.status == "succeeded")
    assert row["runs_failed"] == sum(1 for c in completed if c.status != "succeeded")
    assert row["generations"] == 3 and row["generation"] == 2
    board = client.get("/searches/s1/leaderboard", params={"include_baseline": False}).json()
    assert row["best_idea_id"] == board[0]["idea_id"]
    assert row["best_score"] == pytest.approx(board[0]["mean_score"])
    assert row["final_best_score"] == of_type(S1, ev.SearchCompleted)[0].best_score
    assert row["cost_usd"] == client.get("/searches/s1").json()["cost_usd"]


def test_the_curve_has_every_completed_run_and_the_leaders_best_so_far(client):
    curve = client.get("/searches/s1/curve").json()
    completed = of_type(S1, ev.RunCompleted)
    assert [p["run_id"] for p in curve["runs"]] == [c.run_id for c in completed]  # by time
    assert [p["position"] for p in curve["runs"]] == list(range(1, len(completed) + 1))
    failed = [p for p in curve["runs"] if p["status"] != "succeeded"]
    assert failed and all(p["score"] is None for p in failed)
    modes = {p["mode"] for p in curve["runs"]}
    assert {"baseline", "fresh", "explore", "exploit"} <= modes
    # the curve never gets worse (reward = 1/loss: a lower loss is better), and ends at the
    # leaderboard's leader
    steps = curve["best_so_far"]
    assert all(b["mean_score"] <= a["mean_score"] for a, b in zip(steps, steps[1:], strict=False))
    leader = client.get("/searches/s1/leaderboard", params={"include_baseline": False}).json()[0]
    assert steps[-1]["idea_id"] == leader["idea_id"]
    assert all(curve["runs"][s["position"] - 1]["run_id"] == s["run_id"] for s in steps)
    assert len(curve["baseline_scores"]) == 2
    assert curve["final"][0]["ci95_low"] == 3.05 and curve["final"][0]["title"]
    # tinygpt's manifest is in this checkout: the metric comes from it
    assert curve["metric"]["source"] == "manifest" and curve["metric"]["direction"] == "minimize"


def test_costs_per_generation_add_up_to_the_search_total(client):
    costs = client.get("/searches/s1/costs").json()
    detail = client.get("/searches/s1").json()
    assert [g["generation"] for g in costs["generations"]] == [0, 1, 2]
    ideator = sum(g["ideator_input_tokens"] for g in costs["generations"])
    implementer = sum(g["implementer_input_tokens"] for g in costs["generations"])
    assert ideator + implementer == detail["input_tokens"] == costs["input_tokens"]
    assert sum(g["runs"] for g in costs["generations"]) == len(of_type(S1, ev.RunRequested)) + sum(
        1 for e in of_type(S1, ev.PatchReady)
    )
    assert costs["cost_usd"] == detail["cost_usd"]


def test_every_dashboard_route_is_documented(client):
    paths = client.get("/openapi.json").json()["paths"]
    for path in (
        "/dashboard/searches",
        "/searches/{search_id}/curve",
        "/searches/{search_id}/costs",
        "/runs/{run_id}/log",
        "/patches/{patch_id}/diff",
        "/live",
    ):
        assert (
            path in paths
            and paths[path]["get"].get("description")
            or paths[path]["get"].get("summary")
        ), path
    assert "text/event-stream" in paths["/live"]["get"]["responses"]["200"]["content"]


def test_without_a_broker_the_live_feed_says_how_to_get_one(client):
    response = client.get("/live")
    assert response.status_code == 503 and "GROUNDLOOP_NATS_URL" in response.json()["detail"]


# ------------------------------------------------------------------ with a real broker


async def read_sse(response: httpx.Response, want, timeout: float) -> dict:
    """The first SSE message whose JSON satisfies `want`."""

    async def scan() -> dict:
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                message = json.loads(line[6:])
                if want(message):
                    return message
        raise AssertionError("the live feed ended")

    return await asyncio.wait_for(scan(), timeout)


async def test_live_feed_sends_each_new_event_once_projected(settings: Settings):
    engine = make_engine(settings.resolved_db_url())
    reset_tables(engine)
    stop = asyncio.Event()
    projector = asyncio.create_task(service.run(settings, stop))
    dashboard = await start_dashboard(settings, port=0)
    bus = await Bus.connect(settings, "test")
    story = search_story("live", generations=1, ideas_per_generation=2)
    try:
        for event in story[:3]:
            await bus.publish(event)
        async with httpx.AsyncClient(base_url=dashboard.url, timeout=10) as http:
            async with http.stream("GET", "/live", params={"search_id": "live"}) as response:
                assert response.headers["content-type"].startswith("text/event-stream")
                nxt = story[3]
                assert isinstance(nxt, ev.RunStarted)
                started = time.perf_counter()
                await bus.publish(nxt)
                message = await read_sse(response, lambda m: m["event_id"] == nxt.event_id, 10)
                latency = time.perf_counter() - started
            print(f"live feed: {nxt.type} published -> sent, projected, in {latency * 1000:.0f} ms")
            assert message["projected"] and message["type"] == nxt.type and latency < 3.0
            # reconnecting with Last-Event-ID resumes right after it: nothing missed
            async with http.stream(
                "GET", "/live", headers={"Last-Event-ID": str(message["seq"] - 2)}
            ) as again:
                first = await read_sse(again, lambda m: True, 10)
            assert first["seq"] == message["seq"] - 1
            # what it said is in the projections already
            runs = (await http.get("/searches/live/runs")).json()
            assert [r["status"] for r in runs if r["run_id"] == nxt.run_id] == ["running"]
    finally:
        await bus.close()
        await dashboard.stop()
        stop.set()
        await projector
        engine.dispose()


async def test_a_run_log_is_followed_while_running_then_read_whole(settings: Settings):
    engine = make_engine(settings.resolved_db_url())
    reset_tables(engine)
    story = search_story("logs", generations=1, ideas_per_generation=1)
    started = next(e for e in story if isinstance(e, ev.RunStarted))
    completed = next(
        e for e in story if isinstance(e, ev.RunCompleted) and e.run_id == started.run_id
    )
    project_all(engine, story[: story.index(completed)])  # the run is running
    dashboard = await start_dashboard(settings, port=0)
    bus = await Bus.connect(settings, "test")
    key = f"logs/{started.run_id}/{started.attempt}"
    try:
        async with httpx.AsyncClient(base_url=dashboard.url, timeout=10) as http:
            await bus.put_artifact(f"{key}/000000", b"step 1 loss 3.2\n")
            part = (await http.get(f"/runs/{started.run_id}/log")).json()
            assert part["text"] == "step 1 loss 3.2\n" and not part["complete"]
            assert part["next_chunk"] == 1 and part["status"] == "running"
            await bus.put_artifact(f"{key}/000001", b"step 2 loss 3.1\n")
            await bus.put_artifact(f"{key}/index", b'{"chunks": 2, "bytes": 32, "dropped": 0}')
            project_all(engine, [completed.model_copy(update={"log_key": key})])
            rest = (await http.get(f"/runs/{started.run_id}/log", params={"from_chunk": 1})).json()
            assert rest["text"] == "step 2 loss 3.1\n" and rest["complete"]
            whole = (await http.get(f"/runs/{started.run_id}/log")).json()
            assert whole["text"] == "step 1 loss 3.2\nstep 2 loss 3.1\n"
            assert (await http.get("/runs/nope/log")).status_code == 404
    finally:
        await bus.close()
        await dashboard.stop()
        engine.dispose()


async def test_a_port_in_use_is_refused_with_the_way_out(settings: Settings):
    first = await start_dashboard(settings, port=0)
    port = int(first.url.rstrip("/").rsplit(":", 1)[1])
    try:
        with pytest.raises(DashboardError, match="in use.*--ui-port"):
            await start_dashboard(settings, port=port)
    finally:
        await first.stop()


# ------------------------------------------------------------------ analyses (from the log)


def test_without_a_broker_the_analysis_says_how_to_get_one(client):
    response = client.get("/searches/s1/analysis")
    assert response.status_code == 503 and "GROUNDLOOP_NATS_URL" in response.json()["detail"]


def expected_generations(story: list[ev.Event]) -> dict[int, dict]:
    """Per generation, from the events directly: ideas, valid ones, failure reasons, and the
    best idea's mean score (highest mean reward) and the mean over ideas."""
    ideas = {e.idea_id: e for e in of_type(story, ev.IdeaProposed) if e.mode != "baseline"}
    runs: dict[str, list[ev.RunCompleted]] = {i: [] for i in ideas}
    for r in of_type(story, ev.RunCompleted):
        if r.purpose == "search" and r.idea_id in ideas:
            runs[r.idea_id].append(r)
    failed_patch = {p.idea_id: p.stage for p in of_type(story, ev.PatchFailed)}
    out: dict[int, dict] = {}
    for idea_id, idea in ideas.items():
        g = out.setdefault(idea.generation, {"ideas": 0, "valid": 0, "failures": {}, "scored": []})
        g["ideas"] += 1
        ok = [r for r in runs[idea_id] if r.status == "succeeded" and r.score is not None]
        if ok:
            g["valid"] += 1
            mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
            g["scored"].append((mean([r.reward for r in ok]), mean([r.score for r in ok])))
            continue
        reason = (
            f"run {runs[idea_id][-1].status}"
            if runs[idea_id]
            else f"patch failed ({failed_patch[idea_id]})"
        )
        g["failures"][reason] = g["failures"].get(reason, 0) + 1
    return out


async def test_the_analysis_is_read_from_the_log_with_the_analyze_numbers(settings: Settings):
    engine = make_engine(settings.resolved_db_url())
    reset_tables(engine)
    other = search_story("s2", generations=2, ideas_per_generation=3, seed=1)
    dashboard = await start_dashboard(settings, port=0)
    bus = await Bus.connect(settings, "test")
    try:
        for event in [*S1, *other]:
            await bus.publish(event)
        async with httpx.AsyncClient(base_url=dashboard.url, timeout=30) as http:
            response = await http.get("/searches/s1/analysis", params={"measure": "tfidf"})
            assert response.status_code == 200, response.text
            a = response.json()
            assert (a["search_id"], a["environment"], a["status"]) == ("s1", "tinygpt", "completed")
            # tinygpt is installed in this checkout: its metric and files are used
            assert a["metric"] == {"name": "val_loss", "direction": "minimize"}
            assert a["class_basis"].startswith("syntax trees of tinygpt")
            want = expected_generations(S1)
            assert [g["generation"] for g in a["generations"]] == sorted(want)
            for g in a["generations"]:
                w = want[g["generation"]]
                assert (g["ideas"], g["valid"], g["failures"]) == (
                    w["ideas"],
                    w["valid"],
                    w["failures"],
                )
                assert g["execution_rate"] == pytest.approx(w["valid"] / w["ideas"])
                best = max(w["scored"])  # highest mean reward
                assert g["best_score"] == pytest.approx(best[1])
                assert g["mean_score"] == pytest.approx(
                    sum(s for _, s in w["scored"]) / len(w["scored"])
                )
                share = g["classes"]
                assert (
                    share["hyperparameter"] + share["algorithmic"] + share["unclassified"]
                    == g["ideas"]
                )
                assert 0.0 <= g["diversity"] <= 1.0 and 0.0 < g["distinct_fraction"] <= 1.0
            assert a["totals"]["ideas"] == sum(w["ideas"] for w in want.values())
            assert a["diversity"]["measure"] == "TF-IDF cosine"
            assert len(a["ideas"]) == a["totals"]["ideas"] and "class" in a["ideas"][0]
            assert a["baseline"]["scores"] and a["judge"] is None
            # several side by side, in the order asked, the same numbers as one by one
            both = (await http.get("/analysis", params={"ids": "s2,s1", "measure": "tfidf"})).json()
            assert [x["search_id"] for x in both] == ["s2", "s1"] and both[1] == a
            assert both[0]["totals"]["ideas"] == sum(
                w["ideas"] for w in expected_generations(other).values()
            )
            missing = await http.get("/searches/nope/analysis")
            assert missing.status_code == 404 and "nope" in missing.json()["detail"]
            assert (await http.get("/analysis", params={"ids": "s1,a.b"})).status_code == 422
            # the default measure is the one `groundloop analyze` picks (WordLlama here)
            auto = (await http.get("/searches/s1/analysis")).json()
            assert auto["diversity"]["measure"].startswith("WordLlama")
    finally:
        await bus.close()
        await dashboard.stop()
        engine.dispose()
