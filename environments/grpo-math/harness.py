"""grpo-math run harness (protected): the training clock and the checkpoints the evaluation scores.

train.py asks `clock.seconds_left()` to decide whether another GRPO step fits, and saves the
policy with `save_checkpoint(model, step, clock)` every few steps and at the end. The protected
evaluation scores every saved checkpoint on the validation split and reports the best (the
paper's "best validation accuracy within the budget").

Budget: TRAIN_SECONDS of training counted from the start of the process as the kernel
recorded it. This clock only helps honest code stop in time: the limit is enforced outside
training by the protected budget_guard.py (the manifest's entrypoint), which kills the run and
has it rejected if it is still running TRAIN_SECONDS + its save allowance after launch;
seconds_left() never reaches past the guard's GROUNDLOOP_GUARD_TRAIN_DEADLINE. An operator may set GRPO_MATH_TRAIN_SECONDS, read from the
environment the process was started with (code inside the process cannot change it).

At most MAX_CHECKPOINTS are kept, which bounds the evaluation's time and the disk (a 1.5B
checkpoint is ~3 GB): the first MAX_CHECKPOINTS - 1 saves stay, later saves replace the last
slot, so the final policy is always scored.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

import data

TRAIN_SECONDS = 3000.0
SMOKE_TRAIN_SECONDS = 60.0
MAX_CHECKPOINTS = 4
CHECKPOINT_DIR = Path("out/checkpoints")
META_FILE = "groundloop_meta.json"


def _launch_environment() -> dict[str, str]:
    """The environment this process was exec'd with (immune to os.environ edits)."""
    try:
        raw = Path("/proc/self/environ").read_bytes()
    except OSError:
        return dict(os.environ)
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {key.decode(errors="replace"): value.decode(errors="replace") for key, value in pairs}


def _process_age_seconds() -> float:
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 of stat(5); fields[0] is field 3
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


_LAUNCH_ENV = _launch_environment()
_STARTED = time.monotonic() - _process_age_seconds()


def train_seconds() -> float:
    if data.smoke_mode():
        return SMOKE_TRAIN_SECONDS
    raw = _LAUNCH_ENV.get("GRPO_MATH_TRAIN_SECONDS")
    if not raw:
        return TRAIN_SECONDS
    if not float(raw) > 0:
        raise ValueError(f"GRPO_MATH_TRAIN_SECONDS={raw!r} must be a positive number of seconds")
    return float(raw)


class TrainingClock:
    def __init__(self) -> None:
        self.budget = train_seconds()

    def training_seconds(self) -> float:
        return time.monotonic() - _STARTED

    def seconds_left(self) -> float:
        guard = _LAUNCH_ENV.get("GROUNDLOOP_GUARD_TRAIN_DEADLINE")
        to_guard = float(guard) - time.monotonic() if guard else float("inf")
        return min(self.budget - self.training_seconds(), to_guard)


def checkpoint_dirs() -> list[Path]:
    """Saved checkpoints, oldest step first."""
    if not CHECKPOINT_DIR.is_dir():
        return []
    return sorted(p for p in CHECKPOINT_DIR.glob("step_*") if (p / META_FILE).is_file())


def read_meta(checkpoint: Path) -> dict:
    return json.loads((checkpoint / META_FILE).read_text())


def save_checkpoint(model: torch.nn.Module, step: int, clock: TrainingClock) -> Path:
    """Write the policy (Hugging Face format, safetensors) as out/checkpoints/step_NNNNNN."""
    existing = checkpoint_dirs()
    if len(existing) >= MAX_CHECKPOINTS:
        shutil.rmtree(existing[-1])  # keep the early ones; the last slot follows the newest
    target = CHECKPOINT_DIR / f"step_{step:06d}"
    partial = CHECKPOINT_DIR / f".partial_step_{step:06d}"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)
    model.save_pretrained(partial)
    meta = {"step": step, "train_seconds": clock.training_seconds()}
    (partial / META_FILE).write_text(json.dumps(meta))
    partial.rename(target)
    print(f"saved {target} after {meta['train_seconds']:.1f} s", flush=True)
    return target
