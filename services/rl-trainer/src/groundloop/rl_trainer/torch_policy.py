"""What every torch policy shares: seeded sampling, the GRPO update with a persistent AdamW,
reward-weighted warm-up, the frozen reference and exact checkpoints.

Subclasses say how a context becomes prompt tokens, how tokens become text, and what an idea
is (`knob_policy.KnobLMPolicy`, `hf_policy.HFPolicy`). Dropout stays off throughout (as trl's
disable_dropout does), so sampling, old log-probs and the update see the same function.

Reference policy: a frozen copy of the weights taken when RL starts, i.e. at the end of
`warm_up`, or at the first update when there was no warm-up (`_snapshot_reference`). LoRA
policies override this: their reference is the model with the adapter disabled.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import random
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from groundloop.rl_trainer.grpo import (
    TokenBatch,
    completion_logps,
    group_batch,
    grpo_update,
    token_batch,
    weighted_nll,
)
from groundloop.rl_trainer.policy import (
    Completion,
    GRPOSettings,
    IdeaDraft,
    SamplingContext,
    UpdateStats,
)

STATE_FORMAT = 1
WARM_UP_BATCH = 32


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run with `count` intra-op threads (None: as configured), then restore the setting."""
    if count is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class TorchPolicy:
    kind: str
    model_name: str
    warm_up_learning_rate: float
    # Intra-op threads for this policy's work; None leaves torch's setting. A tiny model's
    # kernels are too small to split, and on a busy machine threads that wait for each other
    # make it several times slower.
    threads: int | None = None

    def __init__(self, model: nn.Module, pad_id: int, stop_ids: set[int], device: torch.device):
        self.model = model.to(device)
        self.model.eval()
        self.pad_id = pad_id
        self.stop_ids = stop_ids
        self.device = device
        self.optimizer: torch.optim.Optimizer | None = None
        self.reference: nn.Module | None = None
        # transformers 5 renamed `past_key_values` to `cache` (the old name warns, then goes).
        get_base = getattr(model, "get_base_model", None)  # a peft wrapper hides the model
        base = get_base() if callable(get_base) else model
        forward = inspect.signature(getattr(base, "forward")).parameters  # noqa: B009
        self._cache_key = "cache" if "cache" in forward else "past_key_values"

    # ------------------------------------------------------------------ subclass hooks

    def prompt_ids(self, context: SamplingContext) -> list[int]:
        raise NotImplementedError

    def decode(self, completion_ids: Sequence[int]) -> str:
        raise NotImplementedError

    def example_ids(self, text: str) -> list[int]:
        """The completion tokens (stop token included) that write `text` as an idea."""
        raise NotImplementedError

    def warm_up_prompt_ids(self, context: SamplingContext | None) -> list[int]:
        raise NotImplementedError

    def to_idea(self, completion: Completion) -> IdeaDraft:
        raise NotImplementedError

    def max_new_tokens(self, settings: GRPOSettings) -> int:
        return settings.max_new_tokens

    def fingerprint(self) -> str:
        """Identifies what a checkpoint fits (model architecture, vocabulary)."""
        raise NotImplementedError

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def model_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def load_model_state(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)

    def reference_logps(self, batch: TokenBatch, temperature: float) -> torch.Tensor:
        if self.reference is None:
            raise RuntimeError("no reference policy yet; it is taken at warm-up or first update")
        return completion_logps(self.reference, batch, temperature)

    def _snapshot_reference(self) -> None:
        self.reference = copy.deepcopy(self.model)
        self.reference.requires_grad_(False)
        self.reference.eval()

    def _needs_reference_copy(self) -> bool:
        return True

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def sample(
        self,
        context: SamplingContext,
        n: int,
        seed: int,
        settings: GRPOSettings | None = None,
    ) -> list[Completion]:
        if n < 1:
            raise ValueError(f"cannot sample {n} completions; ask for at least one")
        settings = settings or GRPOSettings()
        prompt = self.prompt_ids(context)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        with torch_threads(self.threads):
            rows = self._generate(
                prompt, n, self.max_new_tokens(settings), settings.temperature, generator
            )
        return [Completion(self.decode(row), list(prompt), row) for row in rows]

    def _generate(
        self,
        prompt: list[int],
        n: int,
        max_new: int,
        temperature: float,
        generator: torch.Generator,
    ) -> list[list[int]]:
        """Ancestral sampling from softmax(logits / temperature), no top-k/top-p, so the update's
        log-probabilities are those of the distribution actually sampled from."""
        self.model.eval()
        ids = torch.tensor([prompt] * n, dtype=torch.long, device=self.device)
        mask = torch.ones_like(ids)
        out = self.model(input_ids=ids, attention_mask=mask, use_cache=True)
        cache, logits = out[self._cache_key], out.logits[:, -1, :]
        rows: list[list[int]] = [[] for _ in range(n)]
        done = [False] * n
        for _ in range(max_new):
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            picks = torch.multinomial(probs, 1, generator=generator).squeeze(1).tolist()
            for i, token in enumerate(picks):
                if not done[i]:
                    rows[i].append(token)
                    done[i] = token in self.stop_ids
            if all(done):
                break
            # Finished rows keep being fed (their picks are ignored): each row attends only to
            # itself, so this cannot change the unfinished ones, and one batched forward is
            # cheaper than ragged ones.
            feed = torch.tensor(picks, dtype=torch.long, device=self.device).unsqueeze(1)
            mask = torch.cat([mask, torch.ones_like(feed)], dim=1)
            inputs = {"input_ids": feed, "attention_mask": mask, self._cache_key: cache}
            out = self.model(**inputs, use_cache=True)
            cache, logits = out[self._cache_key], out.logits[:, -1, :]
        return rows

    # ------------------------------------------------------------------ learning

    def _optimizer(self, learning_rate: float) -> torch.optim.Optimizer:
        if self.optimizer is None:
            self.optimizer = torch.optim.AdamW(self.trainable_parameters(), lr=learning_rate)
        return self.optimizer

    def update(
        self,
        completions: list[Completion],
        rewards: list[float],
        settings: GRPOSettings,
        context: SamplingContext,
    ) -> UpdateStats:
        """One GRPO step; `context` is not needed again (the prompt travels in the tokens)."""
        del context
        if self.reference is None and self._needs_reference_copy():
            self._snapshot_reference()
        batch = group_batch(completions, self.pad_id, self.device)
        optimizer = self._optimizer(settings.learning_rate)
        with torch_threads(self.threads):
            return grpo_update(
                self.model,
                optimizer,
                batch,
                rewards,
                settings,
                lambda b: self.reference_logps(b, settings.temperature),
            )

    def warm_up(
        self,
        examples: list[tuple[str, float]],
        steps: int,
        seed: int,
        learning_rate: float | None = None,
        context: SamplingContext | None = None,
    ) -> float:
        """Reward-weighted supervised fine-tuning on (idea text, weight >= 0) as completions of
        the prompt `context` gives: minibatches of 32 drawn with `seed`, its own AdamW (not
        kept), learning rate decaying linearly to 10 %. Returns the weighted loss over all
        examples after the last step (0.0 and no change without examples). RL then starts
        afresh: new reference, new optimizer."""
        if steps < 0:
            raise ValueError(f"warm-up steps must be >= 0 (got {steps})")
        if not examples:
            return 0.0  # nothing to imitate: the policy starts as built or loaded
        with torch_threads(self.threads):
            return self._warm_up(examples, steps, seed, learning_rate, context)

    def _warm_up(
        self,
        examples: list[tuple[str, float]],
        steps: int,
        seed: int,
        learning_rate: float | None,
        context: SamplingContext | None,
    ) -> float:
        weights = [w for _, w in examples]
        if min(weights) < 0 or sum(weights) <= 0:
            raise ValueError("warm-up weights must be >= 0 and not all 0 (use rewards, not losses)")
        encoded = [self.example_ids(text) for text, _ in examples]
        prompt = self.warm_up_prompt_ids(context)
        peak = learning_rate or self.warm_up_learning_rate
        optimizer = torch.optim.AdamW(self.trainable_parameters(), lr=peak)
        rng = random.Random(f"warm-up/{seed}")
        order: list[int] = []
        self.model.eval()
        for step in range(steps):
            if len(order) < WARM_UP_BATCH:
                fresh = list(range(len(examples)))
                rng.shuffle(fresh)
                order += fresh
            picks, order = order[:WARM_UP_BATCH], order[WARM_UP_BATCH:]
            loss = self._weighted_loss(
                prompt, [encoded[i] for i in picks], [weights[i] for i in picks]
            )
            for group in optimizer.param_groups:  # linear decay to 10 %: sharper at the end
                group["lr"] = peak * (1.0 - 0.9 * step / max(steps - 1, 1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), 1.0)
            optimizer.step()
        with torch.no_grad():
            total = 0.0
            for start in range(0, len(examples), WARM_UP_BATCH):
                chunk = slice(start, start + WARM_UP_BATCH)
                loss = self._weighted_loss(prompt, encoded[chunk], weights[chunk])
                total += float(loss) * sum(weights[chunk])
        self.optimizer = None
        if self._needs_reference_copy():
            self._snapshot_reference()
        return total / sum(weights)

    def _weighted_loss(
        self, prompt: list[int], completions: list[list[int]], weights: list[float]
    ) -> torch.Tensor:
        batch = token_batch(prompt, completions, self.pad_id, self.device)
        w = torch.tensor(weights, dtype=torch.float32, device=self.device)
        return weighted_nll(self.model, batch, w)

    # ------------------------------------------------------------------ checkpoints

    def state_bytes(self) -> bytes:
        state: dict[str, Any] = {
            "format": STATE_FORMAT,
            "kind": self.kind,
            "fingerprint": self.fingerprint(),
            "model": self.model_state(),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "reference": (
                {k: v.detach().clone() for k, v in self.reference.state_dict().items()}
                if self.reference is not None
                else None
            ),
        }
        buffer = io.BytesIO()
        torch.save(state, buffer)
        return buffer.getvalue()

    def load_state_bytes(self, data: bytes) -> None:
        try:
            state = torch.load(io.BytesIO(data), map_location=self.device, weights_only=True)
        except Exception as exc:  # torch raises several types for a damaged file
            raise ValueError(f"not a policy checkpoint this version can read: {exc}") from None
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(
                f"checkpoint format {state.get('format') if isinstance(state, dict) else '?'} is not {STATE_FORMAT}"
            )
        if state["kind"] != self.kind or state["fingerprint"] != self.fingerprint():
            raise ValueError(
                f"checkpoint is for a {state['kind']} policy with fingerprint {state['fingerprint']}, "
                f"but this is a {self.kind} policy with fingerprint {self.fingerprint()}; load it "
                "into a policy built from the same spec and environment"
            )
        self.load_model_state(state["model"])
        if state["reference"] is None:
            self.reference = None
        else:
            if self.reference is None:
                self._snapshot_reference()
            assert self.reference is not None
            self.reference.load_state_dict(state["reference"])
        self.optimizer = None
        if state["optimizer"] is not None:
            optimizer = self._optimizer(state["optimizer"]["param_groups"][0]["lr"])
            optimizer.load_state_dict(state["optimizer"])
