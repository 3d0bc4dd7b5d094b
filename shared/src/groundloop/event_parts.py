"""The parts events carry: settings, plans, reports and tallies, each a frozen `Record`.

Part of the event contract in `groundloop.events`, which re-exports every name here; a field
change here changes the schema of each event that embeds the part, so it needs that event's
version bump (see `groundloop.events`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Record(BaseModel):
    """Base of every payload model: immutable, strict about unknown fields, no NaN/inf."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


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
    # "generational": the paper's schedule, generation t+1 opens once every idea of t has its
    # result. "steady": t+1 opens once half of t's ideas have a result and every generation
    # before t is complete, so its ideas are written and patched while t's last runs still
    # hold the slots (evolution only; groundloop.evolver.decisions).
    schedule: Literal["generational", "steady"] = "generational"


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
    # How the model writes edits; None: chosen by model strength (whole files for local or
    # small models, unified diffs otherwise: groundloop.implementer.edit_formats).
    edit_format: Literal["diff", "search-replace", "whole-file"] | None = None


class RLSettings(Record):
    """How the rl-trainer learns, for strategies "rl" and "hybrid" (GRPO from execution
    reward: one policy step per generation, the group = the generation's policy slots)."""

    # None: the offline knob language model (CPU, no weights downloaded); "hf:<path>": a
    # Hugging Face causal LM from a local folder or the local cache, trained with LoRA.
    policy: str | None = None
    share: float = Field(default=0.5, gt=0.0, le=1.0)  # hybrid: share of slots the policy writes
    learning_rate: float = Field(default=3e-4, gt=0.0)
    kl_coef: float = Field(default=0.04, ge=0.0)
    clip_eps: float = Field(default=0.2, gt=0.0)
    inner_steps: int = Field(default=2, ge=1)
    temperature: float = Field(default=1.0, gt=0.0)
    max_new_tokens: int = Field(default=512, ge=1)  # the knob LM stops at 4 knobs anyway
    lora_rank: int = Field(default=8, ge=0)
    # Supervised warm-up before step 0 (the knob LM: 300 steps ≈ 95 % executable ideas, 3.5 s).
    warmup_steps: int = Field(default=300, ge=0)
    warm_start_from: str | None = None  # a recorded search whose ideas seed the policy
    # Anti-collapse (all off by default: the paper's plain GRPO).
    novelty_bonus: float = Field(default=0.0, ge=0.0)
    length_bonus: float = Field(default=0.0, ge=0.0)
    length_cap: int = Field(default=64, ge=1)
    past_in_context: int = Field(default=0, ge=0)  # past ideas with rewards shown in the prompt
    collapse_threshold: float = Field(default=0.5, ge=0.0, le=1.0)  # distinct-idea fraction
    collapse_steps: int = Field(default=3, ge=1)


class GenerationPlan(Record):
    """How generation g's ideas are split, and which past ideas each mode sees as context.
    `rl` slots are written by the rl-trainer's policy, the others by the ideator."""

    fresh: int = 0
    explore: int = 0
    exploit: int = 0
    rl: int = 0  # GenerationAdvanced v2
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
