"""The event contract: every fact groundloop records, defined once.

Every service publishes and consumes only these models. Each event is frozen, forbids unknown
fields, has a stable `type` name (never the Python path) and a schema `version`. A committed
JSON-schema snapshot per (type, version) lives in `shared/schemas/`; `tests/test_events.py`
fails when a schema changes without a version bump. Any change to a published schema, even an
added optional field, is a new version; old payloads are lifted by an upcaster in `UPCASTERS`.

Refresh snapshots after a deliberate bump:  python -m groundloop.events --write-schemas
"""

from __future__ import annotations

import json
import re
import sys
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

# uuid5 namespace for derived event ids; changing it would break deduplication of redeliveries.
EVENT_ID_NAMESPACE = uuid.UUID("6f1c1a52-5c0e-4d0b-9a52-67726f756e64")
SEARCH_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"  # one NATS subject token
RESOURCE_CLASSES = ("cpu", "gpu1", "gpu8")
ResourceClass = Literal["cpu", "gpu1", "gpu8"]
SCHEMA_DIR = Path(__file__).parent / "schemas"


E = TypeVar("E", bound="Event")


class InvalidEvent(ValueError):
    """Bytes that are not a valid event; the message says why (recorded on the dead-letter)."""


def derive_event_id(producer: str, cause_id: str, index: int = 0) -> str:
    """Deterministic id of the `index`-th event `producer` emits because of event `cause_id`.

    A redelivered input re-publishes the same ids, and JetStream drops the duplicates.
    """
    return str(uuid.uuid5(EVENT_ID_NAMESPACE, f"{producer}/{cause_id}/{index}"))


def stable_id(*parts: object) -> str:
    """Deterministic id for entities (ideas, patches, runs) derived from their causes."""
    return str(uuid.uuid5(EVENT_ID_NAMESPACE, "/".join(str(p) for p in parts)))


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Record(BaseModel):
    """Base of every payload model: immutable, strict about unknown fields, no NaN/inf."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


# ---------------------------------------------------------------------------- payload parts


class Usage(Record):
    """Tokens and dollars spent by model calls (zero for the offline knob proposer)."""

    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0


class ModelPrice(Record):
    """Dollars per million tokens for one model."""

    input_per_mtok: float
    output_per_mtok: float


class Budgets(Record):
    """Limits of a search; None means unlimited. The search ends when any one is spent."""

    max_generations: int | None = None
    max_runs: int | None = None
    gpu_hours: float | None = None
    dollars: float | None = None


class SearchConfig(Record):
    generations: int = Field(ge=1)
    ideas_per_generation: int = Field(ge=1)
    # Exploit share a(t) as a named schedule; "paper" = min(0.5 + 0.1 * floor(t/2), 0.8).
    exploit_schedule: str = "paper"
    exploit_context: Literal["random", "score_weighted"] = "random"
    context_size: int = 100
    baseline_seeds: int = 2
    final_top_k: int = 3
    final_seeds: int = 3
    generation_deadline_s: float | None = None
    budgets: Budgets = Budgets()


class ProposerSettings(Record):
    kind: Literal["knobs", "llm", "rl"]
    model: str | None = None  # e.g. "anthropic:claude-sonnet-4-5"; None for knobs
    ideas_per_call: int = 10
    thinking_budget: int | None = None


class ImplementerSettings(Record):
    kind: Literal["knobs", "llm"]
    model: str | None = None
    samples: int = 2
    revisions: int = 2


class GenerationPlan(Record):
    """How generation g's ideas are split, and which past ideas each mode sees as context."""

    fresh: int = 0
    explore: int = 0
    exploit: int = 0
    exploit_context_ids: list[str] = []
    explore_context_ids: list[str] = []


class GenerationSummary(Record):
    generation: int
    ideas: int
    patched: int
    succeeded: int
    best_score: float | None = None
    mean_score: float | None = None


class Scored(Record):
    idea_id: str
    score: float


class ProposerInfo(Record):
    """Who wrote an idea. `knobs` is the offline proposer and never a language model."""

    kind: Literal["knobs", "llm", "rl", "import", "baseline"]
    model: str | None = None
    policy_version: int | None = None


class ImplementerInfo(Record):
    kind: Literal["knobs", "llm", "none", "import"]
    model: str | None = None


class PreflightCheck(Record):
    name: str
    ok: bool
    detail: str = ""
    seconds: float = 0.0


class PreflightReport(Record):
    passed: bool
    checks: list[PreflightCheck] = []


class Provenance(Record):
    """Where a number came from; enough to reproduce or distrust it."""

    environment_digest: str
    patched_digest: str | None = None
    patch_digest: str | None = None
    seed: int
    python: str
    torch: str | None = None
    libraries: dict[str, str] = {}
    hardware: str
    host: str
    isolation: dict[str, str] = {}  # what the sandbox enforced here, e.g. {"network": "none"}


class FinalEvaluation(Record):
    """One idea re-run on several seeds at the end of a search."""

    idea_id: str
    scores: list[float]
    mean: float
    ci95_low: float
    ci95_high: float
    p_value_vs_baseline: float | None = None


class Totals(Record):
    ideas: int = 0
    patches: int = 0
    runs: int = 0
    gpu_seconds: float = 0.0
    cost_usd: float = 0.0


# ---------------------------------------------------------------------------- the envelope


class Event(Record):
    """Envelope fields shared by every event. Subclasses fix `type` and `version`."""

    event_id: str = Field(default_factory=lambda: str(uuid.uuid4()))
    search_id: str = Field(pattern=SEARCH_ID_PATTERN)
    occurred_at: datetime = Field(default_factory=_utcnow)
    causation_id: str | None = None
    producer: str

    TYPE: ClassVar[str]
    VERSION: ClassVar[int]

    def subject_key(self) -> str:
        """Last subject token; see `subject()`."""
        return "_"

    def subject(self, prefix: str = "gl") -> str:
        """`<prefix>.<search_id>.<type>.<key>`: `<prefix>.<search>.>` selects one search,
        `<prefix>.*.PatchReady.gpu1` one resource class, `<prefix>.*.GenerationAdvanced.<g>`
        one generation (published with expected-last-subject-sequence 0: exactly once)."""
        return f"{prefix}.{self.search_id}.{self.type}.{self.subject_key()}"  # type: ignore[attr-defined]

    def derive(self, cls: type[E], producer: str, index: int = 0, **fields: Any) -> E:
        """Build an event caused by this one with a deterministic id."""
        return cls(
            event_id=derive_event_id(producer, self.event_id, index),
            search_id=fields.pop("search_id", self.search_id),
            causation_id=self.event_id,
            producer=producer,
            **fields,
        )


class SearchStarted(Event):
    """Emitted by the CLI/API when a search begins. Consumed by the evolver (which measures
    the baseline and opens generation 0), the ideator and implementer (settings), projector."""

    type: Literal["SearchStarted"] = "SearchStarted"
    version: Literal[1] = 1
    environment: str
    environment_digest: str
    strategy: Literal["evolution", "best_of_n", "rl"]
    config: SearchConfig
    proposer: ProposerSettings
    implementer: ImplementerSettings
    price_table: dict[str, ModelPrice] = {}
    seed: int = 0
    forked_from: str | None = None  # search id, when this search is a fork
    forked_generation: int | None = None


class GenerationAdvanced(Event):
    """Emitted by the evolver exactly once per generation (per-generation subject, expected
    sequence 0). Consumed by the ideator, which writes the planned ideas; and the projector."""

    type: Literal["GenerationAdvanced"] = "GenerationAdvanced"
    version: Literal[1] = 1
    generation: int = Field(ge=0)
    plan: GenerationPlan
    previous: GenerationSummary | None = None
    best_so_far: Scored | None = None

    def subject_key(self) -> str:
        return str(self.generation)


class IdeaProposed(Event):
    """Emitted by the ideator (or the rl-trainer, mode "rl"; the evolver for the unpatched
    baseline, mode "baseline"). Consumed by the implementer and the projector."""

    type: Literal["IdeaProposed"] = "IdeaProposed"
    version: Literal[1] = 1
    idea_id: str
    generation: int
    mode: Literal["baseline", "fresh", "explore", "exploit", "rl"]
    parent_ids: list[str] = []
    title: str
    text: str
    proposer: ProposerInfo
    prompt_digest: str | None = None
    knobs: dict[str, float | int | str] | None = None  # structured settings of a knob idea
    usage: Usage = Usage()


class PatchReady(Event):
    """Emitted by the implementer after a patch applied and passed pre-flight. Consumed by
    runners of `resource_class` (subject key), the evolver and the projector."""

    type: Literal["PatchReady"] = "PatchReady"
    version: Literal[1] = 1
    patch_id: str
    idea_id: str
    generation: int
    environment: str
    environment_digest: str
    resource_class: ResourceClass = "cpu"
    diff: str | None = None  # inline when small
    diff_key: str | None = None  # object-store key when large
    diff_digest: str
    patched_digest: str
    files_changed: list[str] = []
    attempts: int = 1
    implementer: ImplementerInfo
    usage: Usage = Usage()
    preflight: PreflightReport
    seed: int = 0

    def subject_key(self) -> str:
        return self.resource_class


class PatchFailed(Event):
    """Emitted by the implementer when no attempt produced a patch that applies and passes
    pre-flight. Consumed by the evolver (the idea is terminal) and the projector."""

    type: Literal["PatchFailed"] = "PatchFailed"
    version: Literal[1] = 1
    idea_id: str
    generation: int
    attempts: int
    stage: Literal["model", "apply", "preflight", "rejected"]
    last_error: str
    usage: Usage = Usage()


class RunRequested(Event):
    """Emitted by the evolver for runs beyond a patch's first: the unpatched baseline on k
    seeds, and the final re-evaluation of the top ideas. Consumed by runners of
    `resource_class` and the projector."""

    type: Literal["RunRequested"] = "RunRequested"
    version: Literal[1] = 1
    run_id: str
    purpose: Literal["baseline", "reeval"]
    idea_id: str | None = None
    patch_id: str | None = None  # None: the unpatched baseline
    generation: int
    environment: str
    environment_digest: str
    resource_class: ResourceClass = "cpu"
    diff: str | None = None
    diff_key: str | None = None
    seed: int

    def subject_key(self) -> str:
        return self.resource_class


class RunStarted(Event):
    """Emitted by a runner when a run's process starts. Consumed by the projector."""

    type: Literal["RunStarted"] = "RunStarted"
    version: Literal[1] = 1
    run_id: str
    patch_id: str | None = None
    idea_id: str | None = None
    runner_id: str
    host: str
    devices: list[str] = []
    seed: int
    attempt: int = 1


class RunCompleted(Event):
    """Emitted by a runner (or, after the last allowed delivery, by whoever records the loss)
    when a run ends. Consumed by the evolver, the rl-trainer (reward) and the projector."""

    type: Literal["RunCompleted"] = "RunCompleted"
    version: Literal[1] = 1
    run_id: str
    patch_id: str | None = None
    idea_id: str | None = None
    generation: int
    purpose: Literal["search", "baseline", "reeval"] = "search"
    status: Literal["succeeded", "failed", "timed_out", "killed", "rejected"]
    metrics: dict[str, float] = {}
    score: float | None = None
    reward: float = 0.0
    seed: int
    wall_seconds: float = 0.0
    gpu_seconds: float = 0.0
    log_key: str | None = None
    error_tail: str | None = None
    reason: str | None = None
    provenance: Provenance | None = None


class SearchCompleted(Event):
    """Emitted by the evolver when the search ends (generations done or a budget spent),
    after the final re-evaluation. Consumed by the projector and the CLI's report."""

    type: Literal["SearchCompleted"] = "SearchCompleted"
    version: Literal[1] = 1
    reason: str
    best_idea_id: str | None = None
    best_score: float | None = None
    baseline_score: float | None = None
    totals: Totals = Totals()
    final: list[FinalEvaluation] = []


class PolicyUpdated(Event):
    """Emitted by the rl-trainer after each policy update. Consumed by the ideator (which
    proposer version is live) and the projector."""

    type: Literal["PolicyUpdated"] = "PolicyUpdated"
    version: Literal[1] = 1
    policy_version: int
    step: int
    checkpoint_key: str | None = None
    mean_reward: float
    max_reward: float
    diversity: float | None = None
    kl: float | None = None


EVENT_TYPES: tuple[type[Event], ...] = (
    SearchStarted,
    GenerationAdvanced,
    IdeaProposed,
    PatchReady,
    PatchFailed,
    RunRequested,
    RunStarted,
    RunCompleted,
    SearchCompleted,
    PolicyUpdated,
)
for _cls in EVENT_TYPES:  # class constants mirror the Literal defaults, for lookups
    _cls.TYPE = _cls.model_fields["type"].default
    _cls.VERSION = _cls.model_fields["version"].default
EVENTS_BY_TYPE: dict[str, type[Event]] = {cls.TYPE: cls for cls in EVENT_TYPES}

AnyEvent = Annotated[Union[tuple(EVENT_TYPES)], Field(discriminator="type")]  # noqa: UP007
_ADAPTER: TypeAdapter[Event] = TypeAdapter(AnyEvent)

# (type, old version) -> function turning that payload dict into the next version's dict.
UPCASTERS: dict[tuple[str, int], Callable[[dict[str, Any]], dict[str, Any]]] = {}


def upcast(payload: dict[str, Any]) -> dict[str, Any]:
    """Lift an old payload to the current version of its type, one step at a time."""
    kind = payload.get("type")
    current = EVENTS_BY_TYPE[kind].VERSION if kind in EVENTS_BY_TYPE else None
    while current is not None and isinstance(payload.get("version"), int) and payload["version"] < current:
        step = UPCASTERS.get((kind, payload["version"]))
        if step is None:
            raise InvalidEvent(f"{kind} v{payload['version']} has no upcaster to v{current}")
        payload = step(dict(payload))
    return payload


def encode(event: Event) -> bytes:
    return event.model_dump_json().encode()


def decode(data: bytes | str | dict[str, Any]) -> Event:
    """The one decoder. Raises InvalidEvent with a readable reason, never anything else."""
    if not isinstance(data, dict):
        try:  # fast path: current-version events validate straight from JSON
            return _ADAPTER.validate_json(data)
        except ValidationError:
            pass  # fall through for upcasting or a precise error message
    try:
        payload = data if isinstance(data, dict) else json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidEvent(f"not JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise InvalidEvent(f"expected a JSON object, got {type(payload).__name__}")
    kind = payload.get("type")
    if kind not in EVENTS_BY_TYPE:
        known = ", ".join(EVENTS_BY_TYPE)
        raise InvalidEvent(f"unknown event type {kind!r}; known types: {known}")
    try:
        return _ADAPTER.validate_python(upcast(payload))
    except ValidationError as exc:
        errors = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()[:5]
        )
        raise InvalidEvent(f"invalid {kind}: {errors}") from None


def schema_of(cls: type[Event]) -> dict[str, Any]:
    return cls.model_json_schema(mode="validation")


def schema_path(cls: type[Event]) -> Path:
    return SCHEMA_DIR / f"{cls.TYPE}.v{cls.VERSION}.json"


def write_schemas() -> list[Path]:
    """Write the snapshot of every current (type, version); refuses to overwrite a different
    snapshot of the same version, because that is exactly the change that needs a bump."""
    SCHEMA_DIR.mkdir(exist_ok=True)
    written = []
    for cls in EVENT_TYPES:
        path, text = schema_path(cls), json.dumps(schema_of(cls), indent=2, sort_keys=True) + "\n"
        if path.exists() and path.read_text() != text:
            raise SystemExit(
                f"{path.name} exists with a different schema: bump {cls.__name__}'s version "
                "(and add an upcaster) instead of rewriting a published schema"
            )
        path.write_text(text)
        written.append(path)
    return written


def is_valid_search_id(search_id: str) -> bool:
    return re.fullmatch(SEARCH_ID_PATTERN, search_id) is not None


if __name__ == "__main__":
    if "--write-schemas" in sys.argv:
        for p in write_schemas():
            print(p)
    else:
        print(__doc__)
