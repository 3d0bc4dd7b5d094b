"""The API's write endpoints (start, stop, fork a search): refused without the configured
token; with it, each records in a real nats-server's log what the CLI would (SearchStarted,
SearchStopped, a fork's copies), signed with the cli role's key; the API's real app served
by real uvicorn (groundloop.api.serve)."""

from __future__ import annotations

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from groundloop import events as ev
from groundloop.api.app import create_app
from groundloop.api.serve import start_dashboard
from groundloop.bus import Bus
from groundloop.identity import SIGNER, load_public_keys
from groundloop.permissions import role_of
from groundloop.settings import Settings
from tests.paths import REPO_ROOT
from tests.search_story import search_story

TOKEN = "s3cret-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
START = {"env": "synthetic", "generations": 2, "ideas": 3, "seed": 7, "search_id": "api-started"}


def offline(tmp_path, token: str | None) -> TestClient:
    """The app with no broker: everything refused before the log is touched."""
    settings = Settings(
        data_dir=tmp_path,
        environments_dir=REPO_ROOT / "environments",
        api_token=SecretStr(token) if token else None,
    )
    return TestClient(create_app(settings))


def test_without_a_configured_token_every_write_is_refused_with_how_to_set_one(tmp_path):
    with offline(tmp_path, None) as client:
        for path, body in (
            ("/searches", START),
            ("/searches/s1/stop", None),
            ("/searches/s1/fork", {"from_generation": 1, "new_search_id": "f"}),
        ):
            response = client.post(path, json=body, headers=AUTH)
            assert response.status_code == 403, path
            assert "GROUNDLOOP_API_TOKEN" in response.json()["detail"]
        assert client.get("/searches").status_code == 200  # reading needs no token


def test_a_missing_or_wrong_token_is_401(tmp_path):
    with offline(tmp_path, TOKEN) as client:
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": f"Basic {TOKEN}"},
            {"Authorization": f"Bearer {TOKEN}x"},
            {"Authorization": "Bearer t\u00e9st".encode("latin-1")},  # not ASCII: a refusal
        ):
            response = client.post("/searches", json=START, headers=headers)
            assert response.status_code == 401, headers
            assert response.headers["www-authenticate"] == "Bearer"
            assert "Bearer" in response.json()["detail"]


@pytest.mark.parametrize(
    ("body", "said"),
    [
        ({"strategy": "evolution"}, "env"),
        ({**START, "generations": 0}, "generations"),
        ({**START, "strategy": "random"}, "strategy"),
        ({**START, "search_id": "a.b"}, "search_id"),
        ({**START, "surprise": 1}, "surprise"),
        ({**START, "env": "../etc"}, "env"),
        ({**START, "env": "nosuchenv"}, "no environment 'nosuchenv'"),
        ({**START, "rl": {"share": 0.5}}, "rl: applies to strategy rl or hybrid"),
        ({**START, "model": "nosuchprovider:model"}, "model"),
        ({**START, "schedule": "asap"}, "schedule"),
        ({**START, "strategy": "best_of_n", "schedule": "steady"}, "only the evolution"),
        ({**START, "strategy": "rl", "schedule": "steady"}, "'body', 'schedule'"),
    ],
)
def test_invalid_start_bodies_are_422_naming_the_field(tmp_path, body, said):
    with offline(tmp_path, TOKEN) as client:
        response = client.post("/searches", json=body, headers=AUTH)
    assert response.status_code == 422
    assert said in str(response.json()["detail"])


async def signer_role(settings: Settings, bus: Bus, seq: int) -> str:
    msg = await bus.js.get_msg(settings.stream, seq)
    keys = {key: role for role, key in load_public_keys(settings.nats_credentials_dir).items()}
    return keys[(msg.headers or {})[SIGNER]]


async def test_start_stop_and_fork_are_recorded_in_the_log_signed_by_the_cli_role(
    settings: Settings,
):
    assert role_of("cli-api") == "cli"
    settings = settings.model_copy(
        update={"api_token": SecretStr(TOKEN), "environments_dir": REPO_ROOT / "environments"}
    )
    # as the evolver writes it: the baseline is measured by runs, with no IdeaProposed (the
    # story's older form has one, which a fork would count as an idea still waiting)
    source = [
        e
        for e in search_story("src", generations=3, ideas_per_generation=2)
        if not (isinstance(e, ev.IdeaProposed) and e.mode == "baseline")
    ]
    dashboard = await start_dashboard(settings, port=0)
    reader = await Bus.connect(settings, "test")
    try:
        for event in source:
            await reader.publish(event)
        async with httpx.AsyncClient(base_url=dashboard.url, headers=AUTH, timeout=20) as http:
            # start: the CLI's SearchStarted, recorded once however often it is asked
            started = await http.post("/searches", json=START)
            assert started.status_code == 201, started.text
            record = started.json()
            assert record["created"] and record["search_id"] == "api-started"
            log = [e async for e in reader.events("api-started")]
            (first,) = log
            assert isinstance(first, ev.SearchStarted) and first.producer == "cli"
            assert (
                first.event_id == record["event_id"] == ev.stable_id("api-started", "SearchStarted")
            )
            assert first.environment == "synthetic" and first.seed == 7
            assert first.config.generations == 2 and first.config.ideas_per_generation == 3
            assert first.proposer.kind == "knobs" and first.rl is None
            assert await signer_role(settings, reader, record["seq"]) == "cli"
            again = await http.post("/searches", json=START)
            assert again.status_code == 200 and not again.json()["created"]
            other = await http.post("/searches", json={**START, "generations": 5})
            assert other.status_code == 409 and "other choices" in other.json()["detail"]
            assert len([e async for e in reader.events("api-started")]) == 1

            # stop: SearchStopped, stage "user"; unknown and already ended searches refused
            stopped = await http.post("/searches/api-started/stop", json={"reason": "enough"})
            assert stopped.status_code == 200, stopped.text
            stop_event = [e async for e in reader.events("api-started")][-1]
            assert isinstance(stop_event, ev.SearchStopped)
            assert (stop_event.stage, stop_event.reason, stop_event.producer) == (
                "user",
                "enough",
                "cli",
            )
            assert await signer_role(settings, reader, stopped.json()["seq"]) == "cli"
            assert not (await http.post("/searches/api-started/stop")).json()["created"]
            missing = await http.post("/searches/nope/stop")
            assert missing.status_code == 404 and "nope" in missing.json()["detail"]
            done = await http.post("/searches/src/stop")
            assert done.status_code == 409 and "SearchCompleted" in done.json()["detail"]

            # fork: the source's past as history copies, then the new SearchStarted
            body = {"from_generation": 1, "new_search_id": "src-fork", "seed": 3}
            forked = await http.post("/searches/src/fork", json=body)
            assert forked.status_code == 201, forked.text
            copies = [e async for e in reader.events("src-fork")]
            assert len(copies) == forked.json()["events"] > 1
            assert all(e.producer.startswith("history:") for e in copies[:-1])
            new = copies[-1]
            assert isinstance(new, ev.SearchStarted) and new.forked_from == "src"
            assert new.forked_generation == 1 and new.seed == 3 and new.producer == "cli"
            assert {e.generation for e in copies if isinstance(e, ev.IdeaProposed)} == {0}
            assert await signer_role(settings, reader, forked.json()["seq"]) == "cli"
            repeat = await http.post("/searches/src/fork", json=body)
            assert repeat.status_code == 200 and not repeat.json()["created"]
            assert len([e async for e in reader.events("src-fork")]) == len(copies)
            taken = await http.post("/searches/src/fork", json={**body, "seed": 4})
            assert taken.status_code == 409
            too_far = await http.post(
                "/searches/src/fork", json={"from_generation": 9, "new_search_id": "f9"}
            )
            assert too_far.status_code == 422 and "never opened generation 8" in too_far.text
            no_source = await http.post("/searches/nope/fork", json=body)
            assert no_source.status_code == 404
    finally:
        await reader.close()
        await dashboard.stop()
