"""The RL part of a search's report: the policy's curves, next to evolution's in a hybrid.

rl_curves.png   per policy step: mean and max reward of the group (the paper's two curves),
                the distinct-idea fraction; in a hybrid search also the mean and max reward
                of the same generation's evolution ideas (reward 0 for an idea whose run or
                patch failed, as the policy is rewarded)
leaderboard.md  a "Policy" section: one row per step, collapse flagged
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from sqlmodel import Session, col, select

from groundloop import events as ev
from groundloop.api.store import PolicyRow, make_engine
from groundloop.bus import Bus
from groundloop.log_follower import LogFollowers
from groundloop.quarantine import Quarantined
from groundloop.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationRewards:
    generation: int
    mean: float
    best: float
    ideas: int


def policy_rows(session: Session, search_id: str) -> list[PolicyRow]:
    query = (
        select(PolicyRow)
        .where(PolicyRow.search_id == search_id)
        .order_by(col(PolicyRow.policy_version))
    )
    return list(session.exec(query))


def evolution_rewards(rows: list, policy_mode: str = "rl") -> list[GenerationRewards]:
    """Per generation, the mean and max reward of the ideas not written by the policy
    (leaderboard rows; an idea with no succeeded run counts 0)."""
    by_generation: dict[int, list[float]] = {}
    for row in rows:
        if row.mode in (policy_mode, "baseline") or row.generation is None:
            continue
        by_generation.setdefault(row.generation, []).append(row.reward or 0.0)
    return [
        GenerationRewards(g, sum(v) / len(v), max(v), len(v))
        for g, v in sorted(by_generation.items())
    ]


def rl_section(
    session: Session, search_id: str, strategy: str | None, rows: list, out_dir: Path
) -> list[str]:
    """Markdown lines for the report (none when the search has no policy step yet), and the
    plot beside it."""
    steps = policy_rows(session, search_id)
    if not steps:
        return []
    evolution = evolution_rewards(rows) if strategy == "hybrid" else []
    _plot(steps, evolution, out_dir / "rl_curves.png", search_id)
    lines = [
        "",
        "## Policy (GRPO from execution reward)",
        "",
        "Reward = the run's search-split reward, 0 for a failed run or patch. Distinct: share of "
        "the group's ideas that differ; similarity: mean pairwise similarity; collapse: distinct "
        "fraction below the threshold for several steps in a row. Plot: rl_curves.png.",
        "",
        "| step | generation | version | group | mean reward | max reward | distinct | "
        "similarity | valid | KL | loss | collapsed |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for s in steps:
        lines.append(
            f"| {s.step} | {_int(s.generation)} | {s.policy_version} | {s.group_size} | "
            f"{_fmt(s.mean_reward)} | {_fmt(s.max_reward)} | {_fmt(s.distinct_fraction)} | "
            f"{_fmt(s.mean_similarity)} | {_fmt(s.valid_fraction)} | {_fmt(s.kl)} | "
            f"{_fmt(s.loss)} | {'yes' if s.collapsed else ''} |"
        )
    if evolution:
        lines += ["", "Evolution ideas of the same search, per generation (same reward rule):", ""]
        lines += ["| generation | ideas | mean reward | max reward |", "|---:|---:|---:|---:|"]
        lines += [
            f"| {e.generation} | {e.ideas} | {_fmt(e.mean)} | {_fmt(e.best)} |" for e in evolution
        ]
    return lines


def _plot(
    steps: list[PolicyRow], evolution: list[GenerationRewards], path: Path, title: str
) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        path.with_suffix(".txt").write_text("matplotlib is not installed: no RL plot\n")
        return
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    x = [s.generation if s.generation is not None else s.step for s in steps]
    top.plot(x, [s.mean_reward for s in steps], marker="o", label="policy: mean reward")
    top.plot(x, [s.max_reward for s in steps], marker="^", label="policy: max reward")
    if evolution:
        ex = [e.generation for e in evolution]
        top.plot(ex, [e.mean for e in evolution], linestyle="--", label="evolution: mean reward")
        top.plot(ex, [e.best for e in evolution], linestyle=":", label="evolution: max reward")
    top.set_ylabel("reward")
    top.set_title(f"{title}: policy steps")
    top.legend(fontsize=8)
    distinct = [s.distinct_fraction for s in steps]
    bottom.plot(
        x,
        [d if d is not None else float("nan") for d in distinct],
        marker="o",
        label="distinct-idea fraction",
    )
    similarity = [s.mean_similarity for s in steps]
    bottom.plot(
        x,
        [v if v is not None else float("nan") for v in similarity],
        marker="x",
        label="mean pairwise similarity",
    )
    for s, xi in zip(steps, x, strict=True):
        if s.collapsed:
            bottom.axvline(xi, color="red", alpha=0.2)
    bottom.set_ylim(-0.05, 1.05)
    bottom.set_xlabel("generation")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _int(value: int | None) -> str:
    return "-" if value is None else str(value)


def _fmt(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.4g}"


class PolicySteps:
    """The generations of a search's log that give the policy slots (a `log_follower.Fold`):
    its policy steps, counted as the log is written."""

    def __init__(self, search_id: str):
        self.search_id, self.steps = search_id, 0

    def add(self, seq: int, entry: ev.Event | Quarantined) -> None:
        if isinstance(entry, ev.GenerationAdvanced) and entry.plan.rl > 0:
            self.steps += 1


async def policy_steps_settled(
    settings: Settings, search_id: str, stop: asyncio.Event, timeout: float = 120.0
) -> None:
    """Wait until every policy step is published and projected: the last group trains on
    results that may come in just before SearchCompleted, and the report should show it.
    Gives up (saying so) after `timeout`, or at Ctrl-C; a later `groundloop report` has it."""
    bus = await Bus.connect(settings, "cli")
    engine = make_engine(settings.resolved_db_url())
    followed = LogFollowers(bus, PolicySteps)  # each poll reads only what is new
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not stop.is_set():
            steps = (await followed.to_end(search_id)).steps
            with Session(engine) as session:
                if len(policy_rows(session, search_id)) >= steps:
                    return
            if loop.time() > deadline:
                log.warning(
                    "search %s: the policy's last step is not in after %.0fs", search_id, timeout
                )
                return
            await asyncio.sleep(0.5)
    finally:
        engine.dispose()
        await bus.close()
