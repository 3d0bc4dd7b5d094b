"""nanogpt run harness (protected): the training budget, the final check, the saved model.

train.py asks `clock.should_stop(step, model)` before every optimiser step and ends with
`save_checkpoint(...)`, which writes out/model.pt for the protected evaluation.

Budget: TRAIN_SECONDS (the paper's 25 minutes) of training, counted from the start of the
process as the kernel recorded it (so importing this module late buys nothing), minus the time
the final mode spends validating. This clock only helps honest code stop in time: the limit
is enforced outside training by the protected budget_guard.py (the manifest's entrypoint),
which kills the whole run and has it rejected if it is still running TRAIN_SECONDS +
SAVE_SECONDS after launch. The clock therefore also stops before the guard's deadline
(GROUNDLOOP_GUARD_TRAIN_DEADLINE, from the launch environment) less twice the longest step. An operator may set NANOGPT_TRAIN_SECONDS (e.g. a short 1-GPU benchmark, or a longer
final check); it is read from the environment the process was started with, which code
running inside the process cannot change.

Final mode (GROUNDLOOP_SPLIT=test, the final check "time to 3.28"): every VAL_EVERY_SECONDS
of training the protected loss (evaluate.loss_sums) scores the test tokens with the clock
paused; training stops once the loss is <= TARGET_VAL_LOSS (NANOGPT_TARGET_VAL_LOSS
overrides) and the training seconds at that moment are saved. evaluate.py re-measures the
saved model before it reports seconds_to_target.

Distributed: rank 0 owns the clock and broadcasts its decisions, so every rank takes the same
number of steps. Smoke mode stops after SMOKE_STEPS steps.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

import data
import evaluate

TRAIN_SECONDS = 1500.0
SAVE_SECONDS = 30.0  # the guard's allowance after TRAIN_SECONDS (manifest --save-seconds)
TARGET_VAL_LOSS = 3.28
VAL_EVERY_SECONDS = 60.0
SMOKE_STEPS = 6
SMOKE_VALIDATE_EVERY = 3  # steps; exercises the final mode's checks on CPU
CHECKPOINT = evaluate.CHECKPOINT


def _launch_environment() -> dict[str, str]:
    """The environment this process was exec'd with (immune to os.environ edits)."""
    try:
        raw = Path("/proc/self/environ").read_bytes()
    except OSError:
        return dict(os.environ)
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {key.decode(errors="replace"): value.decode(errors="replace") for key, value in pairs}


def _process_age_seconds() -> float:
    """Seconds since the kernel started this process; 0 where /proc is unavailable."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 of stat(5); fields[0] is field 3
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


_LAUNCH_ENV = _launch_environment()
_STARTED = time.monotonic() - _process_age_seconds()


def _positive_float(name: str, default: float) -> float:
    raw = _LAUNCH_ENV.get(name)
    if not raw:
        return default
    value = float(raw)
    if not value > 0:
        raise ValueError(f"{name}={raw!r} must be a positive number of seconds / loss")
    return value


def train_seconds() -> float:
    return _positive_float("NANOGPT_TRAIN_SECONDS", TRAIN_SECONDS)


def target_loss() -> float:
    return _positive_float("NANOGPT_TARGET_VAL_LOSS", TARGET_VAL_LOSS)


def split() -> str:
    return _LAUNCH_ENV.get("GROUNDLOOP_SPLIT", os.environ.get("GROUNDLOOP_SPLIT", "val"))


def guard_train_deadline() -> float:
    """The guard's training deadline (time.monotonic() seconds); inf without a guard."""
    raw = _LAUNCH_ENV.get("GROUNDLOOP_GUARD_TRAIN_DEADLINE")
    return float(raw) if raw else float("inf")


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class TrainingClock:
    """Decides, identically on every rank, when training stops."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.rank, self.world = _rank_world()
        self.budget = train_seconds()
        self.split_name = split()
        self.final = self.split_name == "test"
        self.target = target_loss()
        self.paused = 0.0
        self.last_check = 0.0
        self.last_check_loss: float | None = None
        self.seconds_to_target: float | None = None
        self._tokens: torch.Tensor | None = None
        self.guard_deadline = guard_train_deadline()
        self._last_call: float | None = None
        self._longest_step = 0.0

    def _guard_says_stop(self) -> bool:
        """Stop while twice the longest step still fits before the guard's deadline."""
        now = time.monotonic()
        if self._last_call is not None:
            self._longest_step = max(self._longest_step, now - self._last_call)
        self._last_call = now
        return now + 2 * self._longest_step >= self.guard_deadline

    def describe(self) -> str:
        if data.smoke_mode():
            return f"smoke: {SMOKE_STEPS} steps"
        final = (
            f", final mode: stop at {self.split_name} loss <= {self.target}" if self.final else ""
        )
        return f"training budget {self.budget:g} s{final}"

    def training_seconds(self) -> float:
        return time.monotonic() - _STARTED - self.paused

    def should_stop(self, step: int, model: torch.nn.Module) -> bool:
        """Call before each optimiser step with the unwrapped model (not DDP/compiled)."""
        late = self._guard_says_stop()
        if data.smoke_mode():
            if late:
                return True
            if self.final and step > 0 and step % SMOKE_VALIDATE_EVERY == 0:
                if self._check_target(model):
                    return True
            return step >= SMOKE_STEPS
        elapsed = self.training_seconds()
        stop = elapsed >= self.budget or late
        check = (
            self.final and not stop and step > 0 and elapsed - self.last_check >= VAL_EVERY_SECONDS
        )
        stop, check = self._agree(stop, check)
        if check and self._check_target(model):
            stop = True
        return stop

    def _agree(self, stop: bool, check: bool) -> tuple[bool, bool]:
        if self.world == 1:
            return stop, check
        flags = torch.tensor([int(stop), int(check)], dtype=torch.int32, device=self.device)
        dist.broadcast(flags, src=0)
        return bool(flags[0].item()), bool(flags[1].item())

    def _check_target(self, model: torch.nn.Module) -> bool:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        at, began = self.training_seconds(), time.monotonic()
        if self._tokens is None:
            self._tokens = data.eval_tokens(split())
        was_training = model.training
        model.eval()
        total, count = evaluate.loss_sums(
            model,
            self._tokens,
            data.eval_seq_len(),
            evaluate.eval_batch_size(),
            self.device,
            self.rank,
            self.world,
        )
        model.train(was_training)
        if self.world > 1:
            sums = torch.tensor([total, float(count)], dtype=torch.float64, device=self.device)
            dist.all_reduce(sums)
            total, count = sums[0].item(), int(sums[1].item())
        loss = total / count
        self.last_check, self.last_check_loss = at, loss
        self.paused += time.monotonic() - began
        if self.rank == 0:
            print(
                f"final check: {split()} loss {loss:.4f} after {at:.1f} s of training "
                f"(target {self.target})",
                flush=True,
            )
        if loss <= self.target:
            self.seconds_to_target = at
            return True
        return False


def _plain_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights without torch.compile / DDP prefixes, on the CPU."""
    state = {}
    for key, value in model.state_dict().items():
        for prefix in ("_orig_mod.", "module."):
            key = key.replace(prefix, "")
        state[key] = value.detach().to("cpu")
    return state


def save_checkpoint(
    model: torch.nn.Module, model_config: dict, *, step: int, tokens: int, clock: TrainingClock
) -> None:
    """Rank 0 writes out/model.pt (atomically); every rank waits for it."""
    if clock.rank == 0:
        meta = {
            "step": step,
            "tokens": tokens,
            "train_seconds": clock.training_seconds(),
            "world_size": clock.world,
            "split": split(),
            "target_loss": clock.target,
            "seconds_to_target": clock.seconds_to_target,
            "last_check_loss": clock.last_check_loss,
        }
        CHECKPOINT.parent.mkdir(parents=True, exist_ok=True)
        partial = CHECKPOINT.with_suffix(".partial")
        torch.save(
            {
                "model_config": dict(model_config),
                "state_dict": _plain_state_dict(model),
                "meta": meta,
            },
            partial,
        )
        partial.replace(CHECKPOINT)
        print(
            f"saved {CHECKPOINT} after {step} steps, {tokens:,} tokens, "
            f"{meta['train_seconds']:.1f} s",
            flush=True,
        )
    if clock.world > 1:
        dist.barrier()
