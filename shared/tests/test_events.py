"""The event contract: frozen, strict, one decoder, deterministic ids, schema snapshots."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from groundloop import events as ev
from tests.factories import idea, one_search, search_started


def test_every_event_round_trips_through_the_one_decoder():
    for event in one_search():
        assert ev.decode(ev.encode(event)) == event


def test_events_are_frozen_and_forbid_unknown_fields():
    start = search_started()
    with pytest.raises(ValidationError):
        start.seed = 3  # type: ignore[misc]
    payload = json.loads(ev.encode(start))
    payload["surprise"] = 1
    with pytest.raises(ev.InvalidEvent, match="surprise"):
        ev.decode(json.dumps(payload))


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b'{"type": "Nope"}', "unknown event type 'Nope'"),
        (b'{"type": "RunStarted", "version": 1, "search_id": "s"}', "invalid RunStarted"),
        (b"\xff\xfe", "not JSON"),
    ],
)
def test_decoder_says_what_is_wrong(body: bytes, reason: str):
    with pytest.raises(ev.InvalidEvent, match=reason):
        ev.decode(body)


def test_nan_metrics_are_refused():
    payload = json.loads(ev.encode(one_search()[5]))
    assert payload["type"] == "RunCompleted"
    payload["score"] = float("nan")
    with pytest.raises(ev.InvalidEvent):
        ev.decode(json.dumps(payload))


def test_search_id_must_be_one_subject_token():
    with pytest.raises(ValidationError):
        search_started(search_id="a.b")
    assert ev.is_valid_search_id("run-2026_11") and not ev.is_valid_search_id("x>")


def test_derived_ids_are_deterministic_and_distinct():
    start = search_started()
    a, b = idea(start, 0), idea(start, 0)
    assert a.event_id == b.event_id and a.causation_id == start.event_id
    assert idea(start, 1).event_id != a.event_id
    assert ev.derive_event_id("ideator", start.event_id, 0) == a.event_id


def test_subjects_select_a_search_and_a_resource_class():
    events = one_search("abc")
    subjects = {e.type: e.subject("gl") for e in events}
    assert subjects["PatchReady"] == "gl.abc.PatchReady.cpu"
    assert subjects["GenerationAdvanced"] == "gl.abc.GenerationAdvanced.0"
    assert all(s.startswith("gl.abc.") for s in subjects.values())


def test_schema_snapshots_match_or_the_version_was_bumped():
    """A schema change needs a new version (and an upcaster); the old snapshot stays."""
    for cls in ev.EVENT_TYPES:
        path = ev.schema_path(cls)
        assert path.exists(), (
            f"no snapshot for {cls.TYPE} v{cls.VERSION}: run `python -m groundloop.events "
            "--write-schemas` and commit it"
        )
        assert json.loads(path.read_text()) == ev.schema_of(cls), (
            f"{cls.TYPE} changed but is still version {cls.VERSION}: bump its version, add an "
            "upcaster from the old one, and write the new snapshot"
        )


def test_upcaster_lifts_old_versions(monkeypatch: pytest.MonkeyPatch):
    start = search_started()
    current = json.loads(ev.encode(start))
    old = {**current, "version": 0, "rng_seed": current["seed"]}
    del old["seed"]

    def v0_to_v1(payload: dict) -> dict:
        payload["seed"] = payload.pop("rng_seed")
        payload["version"] = 1
        return payload

    with pytest.raises(ev.InvalidEvent, match="no upcaster"):
        ev.decode(json.dumps(old))
    monkeypatch.setitem(ev.UPCASTERS, ("SearchStarted", 0), v0_to_v1)
    assert ev.decode(json.dumps(old)) == start
