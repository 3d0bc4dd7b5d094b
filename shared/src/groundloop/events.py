"""The event contract: every fact groundloop records, defined once.

Every service publishes and consumes only these models. Each event is frozen, forbids unknown
fields, has a stable `type` name (never the Python path) and a schema `version`. A committed
JSON-schema snapshot per (type, version) lives in `shared/schemas/`; `tests/test_events.py`
fails when a schema changes without a version bump. Any change to a published schema, even an
added optional field, is a new version; old payloads are lifted by an upcaster in `UPCASTERS`.

Refresh snapshots after a deliberate bump:  python -m groundloop.events --write-schemas
"""

from __future__ import annotations

import re
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import Field

# The codec and the payload parts are part of the contract: re-exported, so every service
# imports events, parts and decode alike from here.
from groundloop.codec import EventCodec
from groundloop.codec import InvalidEvent as InvalidEvent
from groundloop.codec import encode as encode
from groundloop.codec import schema_of as schema_of
from groundloop.event_parts import Budgets as Budgets
from groundloop.event_parts import FinalEvaluation as FinalEvaluation
from groundloop.event_parts import GenerationPlan as GenerationPlan
from groundloop.event_parts import GenerationSummary as GenerationSummary
from groundloop.event_parts import ImplementerInfo as ImplementerInfo
from groundloop.event_parts import ImplementerSettings as ImplementerSettings
from groundloop.event_parts import ModelPrice as ModelPrice
from groundloop.event_parts import PreflightCheck as PreflightCheck
from groundloop.event_parts import PreflightReport as PreflightReport
from groundloop.event_parts import ProposerInfo as ProposerInfo
from groundloop.event_parts import ProposerSettings as ProposerSettings
from groundloop.event_parts import Provenance as Provenance
from groundloop.event_parts import Record as Record
from groundloop.event_parts import RLSettings as RLSettings
from groundloop.event_parts import Scored as Scored
from groundloop.event_parts import SearchConfig as SearchConfig
from groundloop.event_parts import Totals as Totals
from groundloop.event_parts import Usage as Usage

# uuid5 namespace for derived event ids; changing it would break deduplication of redeliveries.
EVENT_ID_NAMESPACE = uuid.UUID("6f1c1a52-5c0e-4d0b-9a52-67726f756e64")
SEARCH_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"  # one NATS subject token
RESOURCE_CLASSES = ("cpu", "gpu1", "gpu8")
ResourceClass = Literal["cpu", "gpu1", "gpu8"]
SCHEMA_DIR = Path(__file__).parent / "schemas"


E = TypeVar("E", bound="Event")


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
    # v2: implementer.edit_format; v3: strategy "hybrid" and `rl`; v4: config.schedule
    # (older payloads lift unchanged)
    version: Literal[4] = 4
    environment: str
    environment_digest: str
    strategy: Literal["evolution", "best_of_n", "rl", "hybrid"]
    config: SearchConfig
    proposer: ProposerSettings
    implementer: ImplementerSettings
    price_table: dict[str, ModelPrice] = {}
    seed: int = 0
    forked_from: str | None = None  # search id, when this search is a fork
    forked_generation: int | None = None
    rl: RLSettings | None = None  # strategies "rl" and "hybrid"


class GenerationAdvanced(Event):
    """Emitted by the evolver exactly once per generation (per-generation subject, expected
    sequence 0). Consumed by the ideator, which writes the planned ideas; and the projector."""

    type: Literal["GenerationAdvanced"] = "GenerationAdvanced"
    version: Literal[2] = 2  # v2: plan.rl (v1 payloads lift unchanged: no policy slots)
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
    version: Literal[2] = 2
    run_id: str
    patch_id: str | None = None
    idea_id: str | None = None
    runner_id: str
    host: str
    devices: list[str] = []
    seed: int
    attempt: int = 1
    # The protections in force for this run on its host (sandbox.host_protections: name ->
    # what enforces it, or "off: why"); v2. Empty for v1 events, which did not record them.
    isolation: dict[str, str] = {}


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


class IdeasShortfall(Event):
    """Emitted by the ideator when a generation got fewer ideas than planned even after its
    bounded re-asks (unparsable answers, template echoes, duplicates, no untried knob left).
    Consumed by the evolver, which then expects only `proposed` ideas and closes the
    generation once they are terminal instead of waiting for its deadline; and the projector.
    Subject key: the generation (at most one per generation, like GenerationAdvanced)."""

    type: Literal["IdeasShortfall"] = "IdeasShortfall"
    version: Literal[1] = 1
    generation: int = Field(ge=0)
    planned: int = Field(ge=0)
    proposed: int = Field(ge=0)
    reason: str

    def subject_key(self) -> str:
        return str(self.generation)


class SearchStopped(Event):
    """Emitted by the ideator or implementer when the search cannot go on as configured: a
    model that is unreachable, not served, or cannot answer within its timeout would fail
    every idea. One per search and producer (a derived, stable event id), so every idea that
    meets the same failure re-publishes the same event. Consumed by the evolver (the search
    ends: nothing more is dispatched and no SearchCompleted follows), the CLI (exits non-zero
    with `reason`) and the projector (status "stopped"). Subject key: `stage`."""

    type: Literal["SearchStopped"] = "SearchStopped"
    version: Literal[2] = 2  # v2: stage "rl-trainer" (v1 payloads lift unchanged)
    stage: Literal["ideator", "implementer", "evolver", "runner", "rl-trainer", "user"]
    reason: str
    error_type: str | None = None  # e.g. "LLMUnreachable", "ModelNotServed"

    def subject_key(self) -> str:
        return self.stage


class PolicyUpdated(Event):
    """Emitted by the rl-trainer exactly once per policy step (subject key: the step,
    published with the once-per-subject guard): step s trained on generation `generation`'s
    group and produced `policy_version` = s + 1, stored at `checkpoint_key` in the object
    store. Rewards are the runs' search rewards (0 for a failed, rejected or timed-out run, or
    a patch that failed); `shaped_mean_reward` adds the anti-collapse bonuses. Consumed by the
    rl-trainer itself (resume), the evolver (no decision) and the projector (RL curves)."""

    type: Literal["PolicyUpdated"] = "PolicyUpdated"
    version: Literal[2] = 2  # v2: generation, digest, group measures (v1 lifts with defaults)
    policy_version: int
    step: int
    checkpoint_key: str | None = None
    mean_reward: float
    max_reward: float
    diversity: float | None = None  # 1 − mean pairwise similarity of the group's ideas
    kl: float | None = None
    generation: int | None = None
    checkpoint_digest: str | None = None  # sha256 of the checkpoint bytes
    loss: float | None = None
    group_size: int = 0
    rewards: list[float] = []
    shaped_mean_reward: float | None = None
    distinct_fraction: float | None = None
    mean_similarity: float | None = None
    valid_fraction: float | None = None  # ideas that parsed into something executable
    mean_completion_tokens: float | None = None
    collapsed: bool = False  # distinct fraction below the threshold for k steps in a row

    def subject_key(self) -> str:
        return str(self.step)


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
    IdeasShortfall,
    SearchStopped,
)
for _cls in EVENT_TYPES:  # class constants mirror the Literal defaults, for lookups
    _cls.TYPE = _cls.model_fields["type"].default
    _cls.VERSION = _cls.model_fields["version"].default

_CODEC = EventCodec(EVENT_TYPES, SCHEMA_DIR)
EVENTS_BY_TYPE: dict[str, type[Event]] = _CODEC.by_type
AnyEvent = _CODEC.union  # the discriminated union of EVENT_TYPES
# The one codec's functions; an upcaster goes in UPCASTERS[(type, old version)].
UPCASTERS = _CODEC.upcasters


def _run_started_v1_to_v2(payload: dict[str, Any]) -> dict[str, Any]:
    # v1 runners did not record the run's protections: none are claimed for those runs.
    return {**payload, "version": 2, "isolation": {}}


UPCASTERS[("RunStarted", 1)] = _run_started_v1_to_v2
upcast = _CODEC.upcast
decode = _CODEC.decode
schema_path = _CODEC.schema_path
write_schemas = _CODEC.write_schemas


def _lift_unchanged(version: int):
    """An upcaster for a version that only added optional fields or literal values."""

    def lift(payload: dict[str, Any]) -> dict[str, Any]:
        return {**payload, "version": version}

    return lift


# SearchStarted v2 added the optional implementer.edit_format (a v1 search chose it by model).
UPCASTERS[("SearchStarted", 1)] = _lift_unchanged(2)
UPCASTERS[("SearchStarted", 2)] = _lift_unchanged(3)
UPCASTERS[("SearchStarted", 3)] = _lift_unchanged(4)
UPCASTERS[("GenerationAdvanced", 1)] = _lift_unchanged(2)
UPCASTERS[("SearchStopped", 1)] = _lift_unchanged(2)
UPCASTERS[("PolicyUpdated", 1)] = _lift_unchanged(2)


def is_valid_search_id(search_id: str) -> bool:
    return re.fullmatch(SEARCH_ID_PATTERN, search_id) is not None


if __name__ == "__main__":
    if "--write-schemas" in sys.argv:
        for p in write_schemas():
            print(p)
    else:
        print(__doc__)
