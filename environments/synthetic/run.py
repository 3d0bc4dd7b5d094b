"""The synthetic environment's protected run: score the constants in `config.py`.

score = 1 - 0.1 (log10 LEARNING_RATE + 2)^2 - 0.5 (MOMENTUM - 0.9)^2 - 0.05 (log2 WIDTH - 7)^2
        + {"constant": 0, "linear": 0.02, "cosine": 0.05}[SCHEDULE] + 0.01 USE_WARMUP + noise

The optimum (LEARNING_RATE=0.01, MOMENTUM=0.9, WIDTH=128, cosine, warmup) scores 1.06; the
defaults score about 0.62. `noise` is uniform in [-0.001, 0.001], a deterministic function of
GROUNDLOOP_SEED and GROUNDLOOP_SPLIT. The run sleeps SLEEP_SECONDS first (skipped when
GROUNDLOOP_SMOKE=1), then writes {"score": ...} to GROUNDLOOP_METRICS_OUT (or prints it).
Standard library only; runs in milliseconds.
"""

from __future__ import annotations

import json
import math
import os
import random
import time

SCHEDULE_BONUS = {"constant": 0.0, "linear": 0.02, "cosine": 0.05}
NOISE = 0.001


def noise(seed: int, split: str) -> float:
    return NOISE * (2.0 * random.Random(f"{split}/{seed}").random() - 1.0)


def score(
    learning_rate: float,
    momentum: float,
    width: int,
    schedule: str,
    use_warmup: bool,
    seed: int = 0,
    split: str = "val",
) -> float:
    value = (
        1.0
        - 0.1 * (math.log10(learning_rate) + 2.0) ** 2
        - 0.5 * (momentum - 0.9) ** 2
        - 0.05 * (math.log2(width) - 7.0) ** 2
        + SCHEDULE_BONUS[schedule]
        + (0.01 if use_warmup else 0.0)
    )
    return value + noise(seed, split)


def main() -> None:
    import config  # the editable recipe, imported only when run

    seed = int(os.environ.get("GROUNDLOOP_SEED", "0"))
    split = os.environ.get("GROUNDLOOP_SPLIT", "val")
    if os.environ.get("GROUNDLOOP_SMOKE") != "1" and config.SLEEP_SECONDS > 0:
        print(f"sleeping {config.SLEEP_SECONDS}s (stand-in for training)", flush=True)
        time.sleep(config.SLEEP_SECONDS)
    value = score(
        config.LEARNING_RATE,
        config.MOMENTUM,
        config.WIDTH,
        config.SCHEDULE,
        config.USE_WARMUP,
        seed,
        split,
    )
    metrics = json.dumps({"score": value})
    print(f"seed={seed} split={split} {metrics}", flush=True)
    out = os.environ.get("GROUNDLOOP_METRICS_OUT")
    if out:
        with open(out, "w") as handle:
            handle.write(metrics)


if __name__ == "__main__":
    main()
