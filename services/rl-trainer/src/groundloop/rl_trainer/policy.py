"""What the rl-trainer service sees of a learning ideator: the Policy protocol, its data, and
`build_policy`, which picks the implementation from a spec string.

Two implementations exist:
- "knobs-lm" (`knob_policy.KnobLMPolicy`, the offline default): a tiny causal LM built in code
  over a word vocabulary made from the environment's knobs; its completions are knob settings
  such as `LEARNING_RATE = 0.00316 ; WIDTH = 64`. CPU, seconds, nothing downloaded.
- "hf:<local path or model name in the local Hugging Face cache>" (`hf_policy.HFPolicy`): any
  causal LM, prompted with the environment's ideator prompt, trained through LoRA adapters.

Both learn with the same GRPO update (`grpo.py`). This module imports no torch, so the service
can use the data types without paying for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from groundloop.manifest import Manifest

KNOBS_LM = "knobs-lm"
HF_PREFIX = "hf:"

ParseIdeas = Callable[[str], list[tuple[str, str]]]  # completion text -> [(title, text)]


@dataclass(frozen=True)
class SamplingContext:
    prompt_text: str  # the environment's ideator prompt (used by HF policies)
    past: list[tuple[str, float]] = field(default_factory=list)  # earlier ideas with reward


@dataclass(frozen=True)
class Completion:
    text: str  # decoded completion, without the end-of-sequence token
    prompt_ids: list[int]
    completion_ids: list[int]  # as sampled, ending with the stop token when one was emitted


@dataclass(frozen=True)
class IdeaDraft:
    """What a completion means as an idea."""

    title: str
    text: str
    knobs: dict[str, float | int | str] | None  # set for knob ideas; None for free-form text
    valid: bool  # False: unparsable; it is still published and will earn 0
    problem: str | None = None


@dataclass(frozen=True)
class GRPOSettings:
    """One GRPO step's settings. Defaults follow trl's GRPOConfig where it has one
    (beta=0.04, epsilon=0.2, max_grad_norm=1.0, weight_decay=0.0); `inner_steps` is trl's
    num_iterations. The learning rate suits the offline knobs-lm policy (1e-3 learns faster but
    costs validity) and LoRA adapters; training every weight of a real model wants ~1e-6. `temperature` applies both to sampling and to the
    log-probabilities of the update, as in trl, so importance ratios compare like with like.
    `max_new_tokens` is capped by what a policy can emit (the knobs-lm stops at 4 knobs)."""

    learning_rate: float = 3e-4
    kl_coef: float = 0.04
    clip_eps: float = 0.2
    inner_steps: int = 2
    max_new_tokens: int = 512
    temperature: float = 1.0
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        problems = []
        if not self.learning_rate > 0:
            problems.append(f"learning_rate must be > 0 (got {self.learning_rate})")
        if not self.kl_coef >= 0:
            problems.append(f"kl_coef must be >= 0 (got {self.kl_coef})")
        if not 0 < self.clip_eps < 1:
            problems.append(f"clip_eps must be in (0, 1) (got {self.clip_eps})")
        if self.inner_steps < 1:
            problems.append(f"inner_steps must be >= 1 (got {self.inner_steps})")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        if not self.temperature > 0:
            problems.append(f"temperature must be > 0 (got {self.temperature})")
        if not self.max_grad_norm > 0:
            problems.append(f"max_grad_norm must be > 0 (got {self.max_grad_norm})")
        if not self.weight_decay >= 0:
            problems.append(f"weight_decay must be >= 0 (got {self.weight_decay})")
        if problems:
            raise ValueError("invalid GRPO settings: " + "; ".join(problems))


@dataclass(frozen=True)
class UpdateStats:
    """What one GRPO step did. loss, kl and grad_norm are means over the inner steps (kl: the
    k3 estimate per token, averaged per sequence then over the group). A group whose rewards
    are all equal has zero advantages and no learning signal: it is not optimised
    (optimizer_steps 0, parameters and optimizer state untouched) and its loss and kl are
    measured without a gradient step. kl is 0.0 when kl_coef is 0 (not measured, as in trl)."""

    loss: float
    kl: float
    grad_norm: float
    advantages: list[float]
    mean_completion_tokens: float
    optimizer_steps: int = 0


class Policy(Protocol):
    kind: str  # "knobs-lm" or "hf"
    model_name: str  # e.g. "groundloop-knob-lm" or the HF path

    def sample(
        self,
        context: SamplingContext,
        n: int,
        seed: int,
        settings: GRPOSettings | None = None,
    ) -> list[Completion]:
        """n completions, deterministic given seed and weights (on CPU). `settings` gives
        temperature and max_new_tokens (defaults when None)."""
        ...

    def to_idea(self, completion: Completion) -> IdeaDraft: ...

    def update(
        self,
        completions: list[Completion],
        rewards: list[float],
        settings: GRPOSettings,
        context: SamplingContext,
    ) -> UpdateStats:
        """One GRPO step on one group (completions sampled from one context)."""
        ...

    def state_bytes(self) -> bytes:
        """Weights (or LoRA adapter), optimizer and reference: enough to resume exactly."""
        ...

    def load_state_bytes(self, data: bytes) -> None: ...

    def warm_up(
        self,
        examples: list[tuple[str, float]],
        steps: int,
        seed: int,
        learning_rate: float | None = None,
        context: SamplingContext | None = None,
    ) -> float:
        """Reward-weighted supervised fine-tuning on (idea text, weight); the final loss.
        knobs-lm: [] means its own default examples (random valid settings). hf: [] means no
        warm-up (0.0), and examples need `context` (the prompt they answer)."""
        ...


def build_policy(
    spec: str | None,
    manifest: Manifest,
    seed: int,
    parse_ideas: ParseIdeas | None = None,
    lora_rank: int = 8,
) -> Policy:
    """The policy a spec names: None or "knobs-lm" (offline default) or "hf:<model>".
    `parse_ideas` (the LLM ideator's parser, handed in by the service) is required for "hf:";
    `lora_rank` 0 trains every weight of an hf model instead of LoRA adapters."""
    if spec is None or spec.strip() == KNOBS_LM:
        from groundloop.rl_trainer.knob_policy import KnobLMPolicy

        return KnobLMPolicy(manifest, seed)
    if spec.startswith(HF_PREFIX):
        model = spec[len(HF_PREFIX) :].strip()
        if not model:
            raise ValueError(
                f"policy spec {spec!r} names no model; write hf:<local path or model name>"
            )
        if parse_ideas is None:
            raise ValueError(
                f"policy {spec!r} writes free-form ideas and needs `parse_ideas` (the ideator's "
                "parser) to read them; pass it to build_policy"
            )
        from groundloop.rl_trainer.hf_policy import HFPolicy

        return HFPolicy(model, seed, parse_ideas, lora_rank=lora_rank)
    raise ValueError(
        f"unknown policy spec {spec!r}; use {KNOBS_LM!r} (the offline default) or "
        f"'{HF_PREFIX}<local path or Hugging Face model name in the local cache>'"
    )
