"""Every event says who made it: events are signed with the publishing role's key, and every
reader (replay, a live consumer) quarantines an event that is unsigned, forged, signed by an
unknown key, or signed by a role that may not produce it, with the reason."""

from __future__ import annotations

import asyncio
import base64
import logging
from pathlib import Path

import pytest

from groundloop import bus as bus_module
from groundloop import events as ev
from groundloop import identity
from groundloop.broker import EmbeddedBroker, NatsServer, free_port
from groundloop.bus import Bus
from groundloop.consumer import Delivery, consume
from groundloop.settings import Settings
from tests.factories import one_search
from tests.waiting import eventually

SEARCH = "who"


def _of(events: list[ev.Event], type_: str) -> ev.Event:
    return next(e for e in events if e.TYPE == type_)


async def test_readers_quarantine_what_no_role_vouches_for(settings: Settings, tmp_path: Path):
    creds = settings.nats_credentials_dir
    assert creds is not None
    operator = await Bus.connect(settings, "t")
    runner = await Bus.connect(settings, "runner-1")
    projector = await Bus.connect(settings, "projector")
    search = one_search(SEARCH, ideas=1)
    started, idea = search[0], _of(search, "IdeaProposed")
    patch, run_started = _of(search, "PatchReady"), _of(search, "RunStarted")
    runner_key = identity.Signer("runner", identity.load_seed(creds, "runner"))
    ideator_key = identity.Signer("ideator", identity.load_seed(creds, "ideator"))
    stranger = tmp_path / "stranger"
    identity.generate(stranger, ["ideator"])
    stranger_key = identity.Signer("ideator", identity.load_seed(stranger, "ideator"))

    async def raw(event: ev.Event, signer: identity.Signer | None, tamper: bool = False) -> int:
        """Publish through the operator's connection (the broker lets the administrator put
        anything on the log), signed by `signer` or not at all."""
        subject, body = operator.subject_of(event), ev.encode(event)
        headers = {"Nats-Msg-Id": f"raw-{event.event_id}"}
        if signer is not None:
            headers |= signer.headers(subject, body)
        if tamper:
            body = body.replace(b'"seed":0', b'"seed":1')
        return (await operator.js.publish(subject, body, headers=headers)).seq

    try:
        await operator.publish(started)  # the operator vouches for anything
        await runner.publish(run_started)  # its own type, its own producer name
        bad = {
            await raw(idea, None): "unsigned IdeaProposed",
            await raw(patch, runner_key): "role runner may not publish PatchReady",
            await raw(idea.model_copy(update={"producer": "evolver", "event_id": "i2"}), ideator_key): "names producer 'evolver'",
            await raw(run_started.model_copy(update={"event_id": "r2"}), runner_key, tamper=True): "does not match its bytes",
            await raw(idea.model_copy(update={"event_id": "i3"}), stranger_key): "a key of no role",
        }  # fmt: skip
        # Replay: only what a role vouches for.
        assert [e async for e in projector.events(SEARCH)] == [started, run_started]
        recorded = {q.seq: q.reason for q in await operator.quarantined()}
        assert set(recorded) == set(bad)
        for seq, fragment in bad.items():
            assert fragment in recorded[seq] and recorded[seq].startswith("not vouched for")

        # A live consumer of the read side handles the vouched events and dead-letters the rest.
        seen: list[ev.Event] = []

        async def handler(event: ev.Event, delivery: Delivery) -> list[ev.Event]:
            seen.append(event)
            return []

        stop = asyncio.Event()
        task = asyncio.create_task(
            consume(projector, "projector", [projector.subject_filter()], handler, stop=stop)
        )
        letters = await eventually(
            lambda: _at_least(projector.dead_letters("projector"), len(bad)), timeout=20
        )
        stop.set()
        await task
        assert seen == [started, run_started]
        reasons = {int(h["Groundloop-Stream-Seq"]): h["Groundloop-Reason"] for h, _ in letters}
        assert {seq: fragment in reasons[seq] for seq, fragment in bad.items()} == dict.fromkeys(
            bad, True
        )
    finally:
        for bus in (operator, runner, projector):
            await bus.close()


async def _at_least(letters_coro, count: int):
    letters = await letters_coro
    return letters if len(letters) >= count else None


async def test_without_credentials_unsigned_events_are_accepted_and_that_is_said(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """An operator's existing broker without authentication: nothing signed, nothing
    verified, and the process says so once."""
    server = NatsServer(tmp_path / "store", free_port()).start()
    bus_module._said_unverified["once"] = False
    caplog.set_level(logging.WARNING, logger="groundloop.bus")
    try:
        settings = Settings(nats_url=server.url, data_dir=tmp_path / "data")
        first, second = await Bus.connect(settings, "cli"), await Bus.connect(settings, "evolver")
        assert first.signer is None and first.verifier is None
        events = one_search("open", ideas=1)
        for event in events:
            await first.publish(event)
        assert [e async for e in second.events("open")] == events
        said = [r for r in caplog.records if "events are not verified" in r.getMessage()]
        assert len(said) == 1
        await first.close()
        await second.close()
    finally:
        server.stop()


async def test_the_embedded_broker_generates_credentials_its_processes_find(tmp_path: Path):
    with EmbeddedBroker(tmp_path, free_port()) as broker:
        creds = tmp_path / "nats" / "credentials"
        seeds = sorted(creds.glob("*.nk"))
        assert {p.stem for p in seeds} >= {"cli", "runner", "evolver", "operator"}
        assert all(p.stat().st_mode & 0o777 == 0o600 for p in seeds)
        settings = Settings(nats_url=broker.url, data_dir=tmp_path)  # as the CLI builds them
        cli = await Bus.connect(settings, "cli")
        assert cli.signer is not None and cli.verifier is not None and cli.role == "cli"
        started = one_search("emb", ideas=1)[0]
        await cli.publish(started)
        assert [e async for e in cli.events("emb")] == [started]
        await cli.close()
        elsewhere = Settings(nats_url=broker.url, data_dir=tmp_path / "other")
        with pytest.raises(bus_module.BrokerUnavailable, match="refused"):
            await Bus.connect(elsewhere, "cli", 1.0)


def test_a_seed_readable_by_others_is_refused(tmp_path: Path):
    identity.generate(tmp_path, ["runner"])
    (tmp_path / "runner.nk").chmod(0o604)
    with pytest.raises(identity.CredentialsError, match="chmod 600"):
        identity.load_seed(tmp_path, "runner")
    with pytest.raises(identity.CredentialsError, match="no credentials for role 'evolver'"):
        identity.load_seed(tmp_path, "evolver")


def _signed_run_started(tmp_path: Path) -> tuple[dict[str, str], ev.Event, str, bytes]:
    keys = identity.generate(tmp_path, ["runner", "ideator"])
    run_started = _of(one_search("cache", ideas=1), "RunStarted")
    subject, body = run_started.subject("t"), ev.encode(run_started)
    return keys, run_started, subject, body


def test_a_remembered_signature_vouches_only_for_the_very_bytes_it_was_checked_on(
    tmp_path: Path,
):
    keys, event, subject, body = _signed_run_started(tmp_path)
    runner = identity.Signer("runner", identity.load_seed(tmp_path, "runner"))
    ideator = identity.Signer("ideator", identity.load_seed(tmp_path, "ideator"))
    headers = runner.headers(subject, body)
    verified = identity.VerifiedSignatures(bound=16)
    verifier = identity.Verifier(keys, verified)

    def refusal(subject: str, body: bytes, headers: dict[str, str]) -> str | None:
        return verifier.refusal(subject, body, headers, event.TYPE, event.producer)

    assert refusal(subject, body, headers) is None
    assert len(verified) == 1
    assert refusal(subject, body, headers) is None  # remembered, still believed
    tampered = body.replace(b'"attempt":1', b'"attempt":2')
    assert tampered != body
    forged = "does not match its bytes"
    assert forged in (refusal(subject, tampered, headers) or "")
    assert forged in (refusal(subject + "x", body, headers) or "")
    # Another role's key claiming the runner's signature: the signer is part of what was checked.
    claimed = {**headers, identity.SIGNER: ideator.public_key}
    assert forged in (refusal(subject, body, claimed) or "")
    one_bit_off = bytearray(base64.urlsafe_b64decode(headers[identity.SIGNATURE]))
    one_bit_off[0] ^= 1
    other_signature = {
        **headers,
        identity.SIGNATURE: base64.urlsafe_b64encode(one_bit_off).decode(),
    }
    assert forged in (refusal(subject, body, other_signature) or "")
    assert len(verified) == 1  # refusals are never remembered
    # A verifier that does not know the signer refuses it, whatever another one checked.
    stranger = identity.Verifier({"ideator": keys["ideator"]}, verified)
    assert "a key of no role" in (
        stranger.refusal(subject, body, headers, event.TYPE, event.producer) or ""
    )
    # Remembered as a good signature, not as a good event: the producer check still runs.
    assert "names producer" in (
        verifier.refusal(subject, body, headers, event.TYPE, "evolver") or ""
    )


def test_remembered_signatures_stay_within_their_bound(tmp_path: Path):
    keys, event, subject, _ = _signed_run_started(tmp_path)
    runner = identity.Signer("runner", identity.load_seed(tmp_path, "runner"))
    verified = identity.VerifiedSignatures(bound=3)
    verifier = identity.Verifier(keys, verified)
    bodies = [ev.encode(event.model_copy(update={"event_id": f"e{i}"})) for i in range(10)]
    signed = [(body, runner.headers(subject, body)) for body in bodies]
    for body, headers in signed:
        assert verifier.refusal(subject, body, headers, event.TYPE, event.producer) is None
        assert len(verified) <= 3
    assert len(verified) == 3
    oldest, newest = signed[0], signed[-1]
    digest = identity.VerifiedSignatures.digest
    in_cache = [
        digest(runner.public_key, base64.urlsafe_b64decode(h[identity.SIGNATURE]), subject.encode() + b"\n" + b) in verified
        for b, h in (oldest, newest)
    ]  # fmt: skip
    assert in_cache == [False, True]  # the least recently used went first
    # Dropped from memory is checked again, not refused.
    assert verifier.refusal(subject, oldest[0], oldest[1], event.TYPE, event.producer) is None
