"""Random searches for tests that check two ways of computing one view agree (the whole
leaderboard and its first line by one query; the progress display from every run and from
aggregates): ideas of every mode, some patched; runs succeeded, failed (some still carrying a
number, which never counts), timed out, killed, still running, re-evaluated, the unpatched
baseline's; few distinct scores so that means tie, and a pair so large that a database's
AVG summed in arrival order (SQLite's: 0 for 1e16, 1, -1e16) differs from ranking.mean's."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from groundloop import events as ev
from groundloop.manifest import Metric
from tests import factories as f

T0 = datetime(2026, 1, 1, tzinfo=UTC)
SCORES = [0.1, 0.2, 0.3, 0.5, 1.0, 1e16, -1e16]
MODES = ["fresh", "fresh", "exploit", "baseline"]
STATUSES = ["succeeded", "succeeded", "succeeded", "failed", "timed_out", "killed"]


def random_search(rng: random.Random, search_id: str, direction: str) -> list[ev.Event]:
    """One search's events, on a metric of `direction` (maximize or minimize)."""
    reward = "x" if direction == "maximize" else "-x"
    metric = Metric(name="m", direction=direction, reward=reward)  # type: ignore[arg-type]
    ideas = [
        f.idea_proposed(
            search_id,
            n,
            title=f"{search_id} idea {n} " + "x" * rng.randint(0, 80),
            mode=rng.choice(MODES),
        )
        for n in range(rng.randint(0, 6))
    ]
    out: list[ev.Event] = [f.search_started(search_id), *ideas]
    out += [f.patch_ready(i) for i in ideas if rng.random() < 0.7]
    for n in range(rng.randint(0, 40)):
        idea = rng.choice([*ideas, None])
        purpose = "baseline" if idea is None else rng.choice(["search", "search", "reeval"])
        run_id = f"{search_id}-run-{rng.randrange(10**6):06d}-{n}"
        if rng.random() < 0.12:  # started, not completed
            out.append(
                ev.RunStarted(
                    search_id=search_id,
                    producer="runner",
                    run_id=run_id,
                    idea_id=idea and idea.idea_id,
                    runner_id="r1",
                    host="h",
                    seed=n,
                )
            )
            continue
        status = rng.choice(STATUSES)
        score = rng.choice(SCORES) if status == "succeeded" or rng.random() < 0.5 else None
        completed = f.run_result(
            search_id,
            run_id,
            status=status,
            score=score,
            reward=metric.to_reward(score) if score is not None else None,
            purpose=purpose,
            idea_id=idea and idea.idea_id,
        )
        # Equal completion times too: the baseline's order then falls to the run id.
        out.append(completed.model_copy(update={"occurred_at": T0 + timedelta(rng.randint(0, 5))}))
    return out
