"""Projections: the SQL tables the read side folds the event log into.

Tables: searches, generations, ideas, patches, runs, policies, and processed_events (the
tracking record, written in the same transaction as each projection change, so a consumer
applies each event exactly once even though the bus delivers it at least once).

Every timestamp in a projection table comes from an event's `occurred_at`, never from the
clock, so `replay rebuild` reproduces the tables exactly; `table_snapshot` compares two
databases and leaves out the only wall-clock and delivery-order columns
(processed_events.processed_at and .stream_seq).

Written only by groundloop.api.projector; read by the API and the CLI. Any SQLAlchemy URL
works (`make_engine`); SQLite (the default) runs in WAL mode with a busy timeout so the API
reads while the projector writes.
"""

from __future__ import annotations

from datetime import UTC, datetime
from importlib.util import find_spec
from pathlib import Path
from typing import Any, ClassVar

from sqlalchemy import JSON, DateTime, Engine, create_engine, event, inspect, make_url, select
from sqlalchemy.pool import StaticPool
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel


class UTCDateTime(TypeDecorator):
    """Stores naive UTC, returns aware UTC: the same values on SQLite and PostgreSQL."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else as_utc(value).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


def as_utc(value: datetime) -> datetime:
    """Aware UTC; a naive time is taken to be UTC already (events are written in UTC)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _when() -> Any:
    return Field(default=None, sa_type=UTCDateTime)


def _json(default: Any = None) -> Any:
    if isinstance(default, list | dict):
        return Field(default_factory=type(default), sa_type=JSON)
    return Field(default=None, sa_type=JSON)


# `*_event_id` columns record which event a group of columns came from: when two distinct
# events describe the same thing (a redelivered handler that produced a new id), the
# projector keeps a deterministic winner whatever the arrival order (see projector.py).


class SearchRow(SQLModel, table=True):
    __tablename__: ClassVar[str] = "searches"

    search_id: str = Field(primary_key=True)
    status: str = "running"  # running | completed | stopped (SearchStopped)
    # SearchStarted
    environment: str | None = None
    environment_digest: str | None = None
    strategy: str | None = None
    seed: int | None = None
    config: dict | None = _json()
    proposer: dict | None = _json()
    implementer: dict | None = _json()
    forked_from: str | None = None
    forked_generation: int | None = None
    started_at: datetime | None = _when()
    started_event_id: str | None = None
    # GenerationAdvanced (highest generation opened)
    current_generation: int | None = None
    # SearchCompleted
    completed_at: datetime | None = _when()
    completed_event_id: str | None = None
    completion_reason: str | None = None
    best_idea_id: str | None = None
    best_score: float | None = None
    baseline_score: float | None = None
    totals: dict | None = _json()
    final: list | None = _json()


class GenerationRow(SQLModel, table=True):
    __tablename__: ClassVar[str] = "generations"

    search_id: str = Field(primary_key=True)
    generation: int = Field(primary_key=True)
    # GenerationAdvanced(g): the plan of g
    opened_at: datetime | None = _when()
    opened_event_id: str | None = None
    fresh: int | None = None
    explore: int | None = None
    exploit: int | None = None
    plan: dict | None = _json()
    best_so_far_idea_id: str | None = None
    best_so_far_score: float | None = None
    # GenerationAdvanced(g + 1).previous: the summary of g
    closed_at: datetime | None = _when()
    closed_event_id: str | None = None
    ideas: int | None = None
    patched: int | None = None
    succeeded: int | None = None
    best_score: float | None = None
    mean_score: float | None = None


class IdeaRow(SQLModel, table=True):
    __tablename__: ClassVar[str] = "ideas"

    idea_id: str = Field(primary_key=True)
    search_id: str = Field(index=True)
    generation: int | None = None
    # proposed | patch_failed | patched | running | ran (a run succeeded) | run_failed
    status: str = "proposed"
    # IdeaProposed
    proposed_at: datetime | None = _when()
    proposed_event_id: str | None = None
    mode: str | None = None
    title: str | None = None
    text: str | None = None
    proposer_kind: str | None = None
    proposer_model: str | None = None
    policy_version: int | None = None
    parent_ids: list = _json([])
    prompt_digest: str | None = None
    knobs: dict | None = _json()
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    # PatchReady
    patch_id: str | None = None
    patched_at: datetime | None = _when()
    patch_event_id: str | None = None
    # PatchFailed
    patch_failed_at: datetime | None = _when()
    patch_failed_event_id: str | None = None
    patch_stage: str | None = None
    patch_error: str | None = None
    patch_attempts: int | None = None
    patch_failed_cost_usd: float = 0.0
    # Folded from the idea's runs (see run_folds._RunMark); counts are over every run
    runs_open: int = 0  # started, not completed
    runs_completed: int = 0
    runs_succeeded: int = 0
    # Search-split results only (groundloop.ranking): final re-evaluation runs never change
    # them. Nullable, added after the first release: `groundloop replay rebuild` fills them.
    search_runs: int | None = 0  # succeeded search-split runs the means are of
    mean_score: float | None = None
    mean_reward: float | None = None
    best_reward: float | None = None
    best_score: float | None = None
    best_run_id: str | None = None
    search_run_results: dict | None = _json()  # run id -> [score, reward]: the fold's input


class PatchRow(SQLModel, table=True):
    __tablename__: ClassVar[str] = "patches"

    patch_id: str = Field(primary_key=True)
    search_id: str = Field(index=True)
    idea_id: str = Field(index=True)
    event_id: str
    created_at: datetime | None = _when()
    generation: int
    environment: str
    environment_digest: str
    resource_class: str
    diff: str | None = None
    diff_key: str | None = None
    diff_digest: str
    patched_digest: str
    files_changed: list = _json([])
    attempts: int
    implementer_kind: str
    implementer_model: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    preflight_passed: bool
    preflight: dict | None = _json()
    seed: int = 0


class RunRow(SQLModel, table=True):
    __tablename__: ClassVar[str] = "runs"

    run_id: str = Field(primary_key=True)
    search_id: str = Field(index=True)
    # requested | running | succeeded | failed | timed_out | killed | rejected
    status: str = "requested"
    idea_id: str | None = Field(default=None, index=True)
    patch_id: str | None = None
    generation: int | None = None
    purpose: str | None = None  # search | baseline | reeval
    seed: int | None = None
    # RunRequested
    requested_at: datetime | None = _when()
    requested_event_id: str | None = None
    resource_class: str | None = None
    # RunStarted (the highest attempt wins)
    started_at: datetime | None = _when()
    started_event_id: str | None = None
    attempt: int | None = None
    runner_id: str | None = None
    host: str | None = None
    devices: list = _json([])
    # RunCompleted
    completed_at: datetime | None = _when()
    completed_event_id: str | None = None
    score: float | None = None
    reward: float | None = None
    metrics: dict | None = _json()
    wall_seconds: float | None = None
    gpu_seconds: float | None = None
    log_key: str | None = None
    error_tail: str | None = None
    reason: str | None = None
    provenance: dict | None = _json()


class PolicyRow(SQLModel, table=True):
    __tablename__: ClassVar[str] = "policies"

    search_id: str = Field(primary_key=True)
    policy_version: int = Field(primary_key=True)
    event_id: str
    updated_at: datetime | None = _when()
    step: int
    checkpoint_key: str | None = None
    mean_reward: float
    max_reward: float
    diversity: float | None = None
    kl: float | None = None
    # PolicyUpdated v2: the group's measures, for the RL curves.
    generation: int | None = None
    checkpoint_digest: str | None = None
    loss: float | None = None
    group_size: int = 0
    shaped_mean_reward: float | None = None
    distinct_fraction: float | None = None
    mean_similarity: float | None = None
    valid_fraction: float | None = None
    mean_completion_tokens: float | None = None
    collapsed: bool = False


class ProcessedEvent(SQLModel, table=True):
    """Tracking record: (role, event_id) was applied, in the transaction that applied it."""

    __tablename__: ClassVar[str] = "processed_events"
    # Small rows keyed by a random id: one B-tree instead of a table plus its key index.
    __table_args__ = {"sqlite_with_rowid": False}

    role: str = Field(primary_key=True)
    event_id: str = Field(primary_key=True)
    event_type: str
    search_id: str
    occurred_at: datetime | None = _when()
    stream_seq: int | None = None  # JetStream sequence when known (live), None on rebuild
    processed_at: datetime | None = _when()  # wall clock, for lag; not part of snapshots


PROJECTION_MODELS: tuple[type[SQLModel], ...] = (
    SearchRow,
    GenerationRow,
    IdeaRow,
    PatchRow,
    RunRow,
    PolicyRow,
    ProcessedEvent,
)
PROJECTION_TABLES = [m.__table__ for m in PROJECTION_MODELS]  # type: ignore[attr-defined]
# Columns that legitimately differ between a live projection and a rebuild of the same log.
SNAPSHOT_EXCLUDED: dict[str, set[str]] = {"processed_events": {"processed_at", "stream_seq"}}


def make_engine(url: str, *, echo: bool = False, scratch: bool = False) -> Engine:
    """An engine for any SQLAlchemy URL. SQLite gets WAL, a busy timeout and
    synchronous=NORMAL (durable across process crashes; a power cut may lose the last
    transactions, which a rebuild from the log restores). `scratch`: a SQLite file that one
    connection fills and that is thrown away if that fails (a rebuild's): no journal at all,
    so each page is written once rather than to the WAL and then to the file."""
    if not url.startswith("sqlite"):
        url = _with_installed_driver(url)
        # psycopg2: batch UPDATEs too (the projector writes rows in executemany batches).
        extra = {"executemany_mode": "values_plus_batch"} if "+psycopg2" in url else {}
        return create_engine(url, echo=echo, pool_pre_ping=True, **extra)
    in_memory = url in ("sqlite://", "sqlite:///:memory:") or "mode=memory" in url
    if not in_memory and url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///").split("?")[0]).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        echo=echo,
        connect_args={"check_same_thread": False, "timeout": 30},
        # One shared connection for :memory:, otherwise each connection sees its own database.
        **({"poolclass": StaticPool} if in_memory else {}),
    )

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        if not in_memory:
            cursor.execute(f"PRAGMA journal_mode={'OFF' if scratch else 'WAL'}")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA cache_size=-65536")  # 64 MiB: rebuilds touch index pages at random
        cursor.close()

    return engine


def _with_installed_driver(url: str) -> str:
    """`postgresql://` means psycopg 3 to SQLAlchemy 2.1; use psycopg2 (the `postgres` extra)
    when that is the driver installed."""
    parsed = make_url(url)
    if parsed.drivername == "postgresql" and find_spec("psycopg") is None and find_spec("psycopg2"):
        return parsed.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)
    return url


class OutdatedProjections(RuntimeError):
    """The database holds projection tables from an older groundloop (missing columns)."""


def create_tables(engine: Engine, *, outdated_ok: bool = False) -> None:
    """Create the projection tables that are missing; refuse tables of an older layout,
    which would fail on the first write (projections are rebuilt from the log, never migrated).
    `outdated_ok`: a rebuild, which replaces them anyway."""
    SQLModel.metadata.create_all(engine, tables=PROJECTION_TABLES)
    if outdated_ok:
        return
    inspector = inspect(engine)
    for table in PROJECTION_TABLES:
        have = {c["name"] for c in inspector.get_columns(table.name)}
        missing = sorted(c.name for c in table.columns if c.name not in have)
        if missing:
            raise OutdatedProjections(
                f"projection table {table.name!r} in {engine.url.render_as_string()} lacks "
                f"columns {missing}: it was written by an older groundloop. Rebuild the "
                "projections from the log: `groundloop replay rebuild` (the log is untouched)"
            )


def drop_tables(engine: Engine) -> None:
    SQLModel.metadata.drop_all(engine, tables=PROJECTION_TABLES)


def reset_tables(engine: Engine) -> None:
    """Drop and recreate every projection table (the start of a rebuild)."""
    drop_tables(engine)
    create_tables(engine)


def table_snapshot(engine: Engine) -> dict[str, list[dict[str, Any]]]:
    """Every projection table as rows of plain values, sorted by primary key in Python (so
    two databases of different kinds compare equal), without SNAPSHOT_EXCLUDED columns."""
    snapshot: dict[str, list[dict[str, Any]]] = {}
    with engine.connect() as conn:
        for table in sorted(PROJECTION_TABLES, key=lambda t: t.name):
            excluded = SNAPSHOT_EXCLUDED.get(table.name, set())
            keys = [c.name for c in table.primary_key.columns]
            rows = [dict(r._mapping) for r in conn.execute(select(table))]
            rows.sort(key=lambda r: tuple(r[k] for k in keys))
            snapshot[table.name] = [{k: v for k, v in r.items() if k not in excluded} for r in rows]
    return snapshot
