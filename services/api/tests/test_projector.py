"""The projector: every event folded exactly once, in any arrival order, with its tracking
record in the same transaction; on SQLite and (when reachable) PostgreSQL; and as a service
consuming a real nats-server."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlmodel import Session, select

from groundloop import events as ev
from groundloop.api import service
from groundloop.api.projector import FOLDS, apply, apply_many, project_all
from groundloop.api.store import (
    IdeaRow,
    ProcessedEvent,
    RunRow,
    make_engine,
    table_snapshot,
)
from groundloop.bus import Bus
from tests.projections import STORY, apply_each, fresh_engine
from tests.search_story import search_story
from tests.waiting import eventually


def reference_tables():
    engine = fresh_engine()
    project_all(engine, STORY)
    return table_snapshot(engine)


REFERENCE = reference_tables()


def runs_of(events, cls):
    return [e for e in events if isinstance(e, cls)]


def test_every_event_type_has_a_fold():
    assert set(FOLDS) == set(ev.EVENT_TYPES)


def test_applying_the_same_events_twice_changes_nothing(db_url):
    engine = fresh_engine(db_url)
    assert apply_each(engine, STORY) == [True] * len(STORY)
    first = table_snapshot(engine)
    assert apply_each(engine, STORY) == [False] * len(STORY)
    assert project_all(engine, STORY) == 0
    assert table_snapshot(engine) == first
    ideas = runs_of(STORY, ev.IdeaProposed)
    assert len(first["ideas"]) == len(ideas) and len(first["processed_events"]) == len(STORY)
    assert len(first["runs"]) == len({e.run_id for e in runs_of(STORY, ev.RunCompleted)})
    engine.dispose()


def test_batched_rebuild_equals_event_by_event_and_across_databases(db_url):
    one_by_one = fresh_engine(db_url)
    apply_each(one_by_one, STORY)
    batched = fresh_engine(db_url)
    assert project_all(batched, STORY, batch_size=7) == len(STORY)
    assert table_snapshot(one_by_one) == table_snapshot(batched) == REFERENCE  # REFERENCE: SQLite
    one_by_one.dispose()
    batched.dispose()


def test_an_interrupted_rebuild_resumes_where_it_stopped():
    engine = fresh_engine()
    assert project_all(engine, STORY[:100], batch_size=30) == 100
    assert project_all(engine, STORY, batch_size=30) == len(STORY) - 100
    assert table_snapshot(engine) == REFERENCE


def test_run_completed_before_run_started_gives_the_same_tables(db_url):
    swapped = list(STORY)
    for i, event in enumerate(swapped[:-1]):
        following = swapped[i + 1]
        if isinstance(event, ev.RunStarted) and isinstance(following, ev.RunCompleted):
            swapped[i], swapped[i + 1] = following, event
    assert swapped != STORY
    engine = fresh_engine(db_url)
    apply_each(engine, swapped)
    assert table_snapshot(engine) == REFERENCE
    with Session(engine) as session:
        run = session.get(RunRow, runs_of(STORY, ev.RunStarted)[0].run_id)
        assert (
            run.status == "succeeded" and run.runner_id is not None and run.started_at is not None
        )
        assert not session.exec(select(IdeaRow).where(IdeaRow.status == "running")).all()
    engine.dispose()


@hsettings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(order=st.randoms(use_true_random=False), batch=st.sampled_from([1, 5, 64, 500]))
def test_any_arrival_order_gives_the_same_tables(order, batch):
    shuffled = list(STORY)
    order.shuffle(shuffled)
    engine = fresh_engine()
    project_all(engine, shuffled, batch_size=batch)
    assert table_snapshot(engine) == REFERENCE


def test_idea_and_run_columns_follow_the_events():
    ideas = {r["idea_id"]: r for r in REFERENCE["ideas"]}
    completions = runs_of(STORY, ev.RunCompleted)
    for proposed in runs_of(STORY, ev.IdeaProposed):
        idea = ideas[proposed.idea_id]
        mine = [c for c in completions if c.idea_id == proposed.idea_id]
        won = [c for c in mine if c.status == "succeeded"]
        failed_patch = any(
            isinstance(e, ev.PatchFailed) and e.idea_id == proposed.idea_id for e in STORY
        )
        expected = (
            "ran"
            if won
            else "run_failed"
            if mine
            else "patch_failed"
            if failed_patch
            else "patched"
        )
        assert idea["status"] == expected, proposed.title
        assert idea["runs_completed"] == len(mine) and idea["runs_succeeded"] == len(won)
        # mean and best are of search-split runs: the final re-evaluation never counts
        ranked = [c for c in won if c.purpose != "reeval"]
        assert idea["best_reward"] == (max(c.reward for c in ranked) if ranked else None)
        assert idea["search_runs"] == len(ranked)
        if ranked:
            assert idea["mean_reward"] == pytest.approx(sum(c.reward for c in ranked) / len(ranked))
        assert idea["title"] == proposed.title and idea["parent_ids"] == proposed.parent_ids
    baseline = next(i for i in ideas.values() if i["mode"] == "baseline" and i["search_id"] == "s1")
    assert baseline["runs_succeeded"] == 2
    generations = [g for g in REFERENCE["generations"] if g["search_id"] == "s1"]
    assert [g["generation"] for g in generations] == [0, 1, 2]
    assert generations[0]["closed_at"] is not None and generations[2]["closed_at"] is None
    search = next(s for s in REFERENCE["searches"] if s["search_id"] == "s1")
    assert search["status"] == "completed" and search["current_generation"] == 2


def _completion(base: ev.RunCompleted, minutes: int, **changes) -> ev.RunCompleted:
    """The same run completed again under a new event id (a re-run handler)."""
    fields = base.model_dump() | changes
    fields["event_id"] = ev.stable_id(base.event_id, "again", minutes)
    fields["occurred_at"] = base.occurred_at + timedelta(minutes=minutes)
    return ev.RunCompleted(**fields)


def test_duplicate_completions_resolve_the_same_way_in_any_order():
    """A success beats a failure; among successes the earliest wins."""
    first = next(
        e
        for e in runs_of(STORY, ev.RunCompleted)
        if e.status == "succeeded" and e.purpose == "search"
    )
    failed_earlier = _completion(first, -5, status="failed", score=None, reward=0.0, metrics={})
    better_but_later = _completion(first, 10, reward=first.reward + 1.0)
    other_run = _completion(first, 1, run_id="another-run", reward=first.reward + 0.5)
    snapshots = []
    for extra in itertools.permutations([failed_earlier, better_but_later, other_run]):
        for events in (STORY + list(extra), list(extra) + STORY):
            engine = fresh_engine()
            project_all(engine, events, batch_size=25)
            snapshots.append(table_snapshot(engine))
    assert all(s == snapshots[0] for s in snapshots)
    run = next(r for r in snapshots[0]["runs"] if r["run_id"] == first.run_id)
    assert (run["status"], run["reward"], run["completed_event_id"]) == (
        "succeeded",
        first.reward,
        first.event_id,
    )
    idea = next(i for i in snapshots[0]["ideas"] if i["idea_id"] == first.idea_id)
    assert (idea["best_run_id"], idea["best_reward"], idea["runs_completed"]) == (
        "another-run",
        first.reward + 0.5,
        2,
    )


def test_best_run_is_recomputed_when_the_winning_completion_gets_worse():
    first = next(
        e
        for e in runs_of(STORY, ev.RunCompleted)
        if e.status == "succeeded" and e.purpose == "search"
    )
    second_run = _completion(first, 1, run_id="second-run", reward=first.reward + 0.5)
    # Applied first, this later-but-higher completion makes run 1 the idea's best; then the
    # earlier (winning, lower) completion replaces it, and the best must move to the second run.
    higher_later = _completion(first, 30, reward=first.reward + 1.0)
    engine = fresh_engine()
    rest = [e for e in STORY if e.event_id != first.event_id]
    project_all(engine, rest + [higher_later, second_run], batch_size=1)
    with Session(engine) as session:
        assert session.get(IdeaRow, first.idea_id).best_run_id == first.run_id
    project_all(engine, [first])
    with Session(engine) as session:
        idea = session.get(IdeaRow, first.idea_id)
        assert (idea.best_run_id, idea.best_reward) == ("second-run", first.reward + 0.5)
        assert session.get(RunRow, first.run_id).reward == first.reward
    in_order = fresh_engine()
    project_all(in_order, STORY + [higher_later, second_run])
    assert table_snapshot(in_order) == table_snapshot(engine)


def test_the_highest_attempt_of_a_run_start_wins():
    started = runs_of(STORY, ev.RunStarted)[0]
    retry = started.model_copy(
        update={
            "event_id": "retry",
            "attempt": 2,
            "runner_id": "runner-9",
            "occurred_at": started.occurred_at - timedelta(seconds=1),
        }
    )
    for order in ([started, retry], [retry, started]):
        engine = fresh_engine()
        apply_each(engine, order)
        with Session(engine) as session:
            run = session.get(RunRow, started.run_id)
            assert (run.attempt, run.runner_id, run.status) == (2, "runner-9", "running")
            assert session.get(IdeaRow, started.idea_id).status == "running"


FAIL_ON_INSERT = {
    "sqlite": [
        "CREATE TRIGGER refuse BEFORE INSERT ON {table} BEGIN SELECT RAISE(ABORT, 'refused by test'); END"
    ],
    "postgresql": [
        "CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'refused by test'; END $$ LANGUAGE plpgsql",
        "CREATE TRIGGER refuse BEFORE INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION refuse()",
    ],
}


@pytest.mark.parametrize("table", ["processed_events", "runs"])
def test_a_failed_apply_leaves_neither_projection_nor_tracking_record(db_url, table):
    """The projection change and the processed record commit together or not at all."""
    engine = fresh_engine(db_url)
    with engine.begin() as conn:
        for statement in FAIL_ON_INSERT[engine.dialect.name]:
            conn.execute(text(statement.format(table=table)))
    completed = runs_of(STORY, ev.RunCompleted)[0]
    with Session(engine) as session:
        with pytest.raises(DBAPIError, match="refused by test"):
            apply(session, completed)
    assert all(rows == [] for rows in table_snapshot(engine).values())
    with engine.begin() as conn:
        conn.execute(
            text(
                f"DROP TRIGGER refuse{' ON ' + table if engine.dialect.name == 'postgresql' else ''}"
            )
        )
    assert apply_each(engine, [completed]) == [True]
    snapshot = table_snapshot(engine)
    assert len(snapshot["runs"]) == len(snapshot["processed_events"]) == len(snapshot["ideas"]) == 1
    engine.dispose()


def test_a_failed_batch_commits_nothing_of_itself_and_keeps_earlier_batches():
    engine = fresh_engine()
    with engine.begin() as conn:
        conn.execute(text(FAIL_ON_INSERT["sqlite"][0].format(table="policies")))
    first_policy = next(i for i, e in enumerate(STORY) if isinstance(e, ev.PolicyUpdated))
    with pytest.raises(DBAPIError):
        project_all(engine, STORY, batch_size=10)
    with Session(engine) as session:
        done = len(session.exec(select(ProcessedEvent)).all())
    assert done == first_policy - first_policy % 10  # every whole batch before the failing one
    with engine.begin() as conn:
        conn.execute(text("DROP TRIGGER refuse"))
    assert project_all(engine, STORY) == len(STORY) - done
    assert table_snapshot(engine) == REFERENCE


def test_handle_applies_once_and_emits_nothing(tmp_path):
    deps = service.ProjectorDeps(fresh_engine(f"sqlite:///{tmp_path / 'p.db'}"))
    for event in STORY[:20] + STORY[:20]:
        assert service.handle(event, deps) == []
    snapshot = table_snapshot(deps.engine)
    assert len(snapshot["processed_events"]) == 20


def test_events_applied_together_give_the_tables_of_one_by_one(db_url):
    """apply_many: the same tables as `apply` per event; an event processed before, or a
    second copy within the same call, is reported False and changes nothing."""
    engine = fresh_engine(db_url)
    flags = []
    for start in range(0, len(STORY), 7):
        chunk = [(event, None) for event in STORY[start : start + 7]]
        again = STORY[max(start - 3, 0) : start]  # applied by the call before
        entries = chunk + [(event, None) for event in again] + chunk[:1]
        with Session(engine) as session:
            flags.append(apply_many(session, entries))
        assert flags[-1] == [True] * len(chunk) + [False] * (len(again) + 1)
    assert table_snapshot(engine) == REFERENCE
    with Session(engine) as session:
        assert apply_many(session, [(event, None) for event in STORY[:5]]) == [False] * 5
    engine.dispose()


def test_a_batch_with_a_failing_event_folds_the_others_alone(tmp_path):
    """One transaction for events that arrive together; when it fails, each is folded in its
    own, so only the bad one fails (and is retried by the consumer), the others are kept."""
    deps = service.ProjectorDeps(fresh_engine(f"sqlite:///{tmp_path / 'p.db'}"))
    with deps.engine.begin() as conn:
        conn.execute(text(FAIL_ON_INSERT["sqlite"][0].format(table="policies")))
    policy = next(i for i, e in enumerate(STORY) if isinstance(e, ev.PolicyUpdated))
    entries = [(event, seq) for seq, event in enumerate(STORY[: policy + 3], 1)]
    outcomes = service.handle_batch(entries, deps)
    assert [i for i, outcome in enumerate(outcomes) if outcome is not None] == [policy]
    assert isinstance(outcomes[policy], DBAPIError)
    projected = {row.event_id for row in _processed_rows(deps.engine)}
    assert projected == {e.event_id for e, _ in entries} - {STORY[policy].event_id}
    assert {row.stream_seq for row in _processed_rows(deps.engine)} == (
        set(range(1, policy + 4)) - {policy + 1}
    )
    deps.engine.dispose()


async def test_events_handed_in_together_are_folded_in_one_transaction(tmp_path):
    engine = fresh_engine(f"sqlite:///{tmp_path / 'p.db'}")
    batches = service.Batches(service.ProjectorDeps(engine))
    await batches.fold(STORY[0], 1)  # alone: nothing else was waiting
    await asyncio.gather(*(batches.fold(e, seq) for seq, e in enumerate(STORY[1:12], 2)))
    rows = sorted(_processed_rows(engine), key=lambda row: row.stream_seq)
    assert [row.stream_seq for row in rows] == list(range(1, 13))
    assert rows[0].processed_at != rows[1].processed_at  # two transactions: 1, then 11
    assert len({row.processed_at for row in rows[1:]}) == 1
    reference = fresh_engine()
    apply_each(reference, STORY[:12])
    assert _without_processed_at(table_snapshot(engine)) == _without_processed_at(
        table_snapshot(reference)
    )
    engine.dispose()


def _without_processed_at(tables: dict) -> dict:
    return {
        name: [
            {k: v for k, v in row.items() if k not in ("processed_at", "stream_seq")}
            for row in rows
        ]
        for name, rows in tables.items()
    }


async def test_service_projects_the_bus_exactly_once(settings):
    """Publish a search, run the projector against a real broker, redeliver everything
    under the consumer's nose (a fresh durable replays the stream): same tables."""
    events = search_story("live", generations=2, ideas_per_generation=5)
    bus = await Bus.connect(settings, "test-publisher")
    try:
        for event in events:
            await bus.publish(event)
        engine = make_engine(settings.resolved_db_url())

        async def drained() -> bool:
            with contextlib.suppress(Exception):  # the consumer may not exist yet
                info = await bus.js.consumer_info(settings.stream, "projector")
                return (
                    info.delivered.stream_seq == len(events)
                    and info.num_pending == 0
                    and info.num_ack_pending == 0
                )
            return False

        async def project_until_done() -> None:
            stop = asyncio.Event()
            task = asyncio.create_task(service.run(settings, stop))
            try:
                await eventually(drained, timeout=60, what="the projector draining the stream")
            finally:
                stop.set()
                await asyncio.wait_for(task, 30)

        await project_until_done()
        first = table_snapshot(engine)
        seqs = [r.stream_seq for r in _processed_rows(engine)]
        assert sorted(seqs) == list(range(1, len(events) + 1))  # live records carry the stream seq
        # The consumer's own dedupe lives in NATS KV; wipe it so every event is redelivered
        # and only the SQL tracking record stands between a redelivery and a double count.
        await bus.js.delete_key_value(f"{settings.stream}_processed")
        await bus.js.delete_consumer(settings.stream, "projector")
        await bus.ensure()
        await project_until_done()
        assert table_snapshot(engine) == first
        rebuilt = fresh_engine()
        project_all(rebuilt, [e async for e in bus.events()])
        assert table_snapshot(rebuilt) == first
        with_seqs = fresh_engine()
        project_all(with_seqs, [pair async for pair in bus.raw_events()])
        live_seqs = {r.event_id: r.stream_seq for r in _processed_rows(engine)}
        assert {r.event_id: r.stream_seq for r in _processed_rows(with_seqs)} == live_seqs
    finally:
        await bus.close()


def _processed_rows(engine) -> list[ProcessedEvent]:
    with Session(engine) as session:
        return list(session.exec(select(ProcessedEvent)))


def test_random_story_sizes_stay_consistent():
    rng = random.Random(7)
    for _ in range(3):
        events = search_story(
            f"r{rng.randrange(1000)}",
            generations=rng.randint(1, 4),
            ideas_per_generation=rng.randint(1, 9),
        )
        a, b = fresh_engine(), fresh_engine()
        project_all(a, events)
        apply_each(b, list(reversed(events)))
        assert table_snapshot(a) == table_snapshot(b)
