"""A search's report folder, written from the projections (so it can be re-written any time).

leaderboard.md / leaderboard.csv   ideas ranked by mean search-split reward (groundloop.ranking),
                                   each number with its split and run count; the final
                                   re-evaluation in its own table / columns
best_so_far.png                    the leader's mean search-split score by completed search run
                                   (needs matplotlib: the `report` extra)
rl_curves.png                      RL searches: the policy's curves (report_rl.py), with a
                                   "Policy" section in leaderboard.md
best.patch                         the best idea's diff
summary.json                       the search row, final re-evaluation, totals, baseline
logs/<run_id>.log                  logs of the best runs, fetched by the caller (see search_job)
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from sqlmodel import Session

from groundloop.api import ranking
from groundloop.api.store import IdeaRow, PatchRow, SearchRow
from groundloop.api.usage import ModelUsage, model_usage
from groundloop.cli.report_rl import policy_rows, rl_section
from groundloop.manifest import Metric
from groundloop.ranking import CurvePoint, Standing


@dataclass(frozen=True)
class LeaderboardRow:
    """One idea. `score`/`reward` are means over `runs` succeeded runs on the search split
    (`split`), the numbers it is ranked by (groundloop.ranking); `final_*` is its final
    re-evaluation on `final_split`, which never changes the ranking. Ideas without a
    search-split result come last, unranked."""

    rank: int | None
    idea_id: str
    generation: int | None
    mode: str | None
    title: str
    split: str
    score: float | None
    reward: float | None
    runs: int
    best_run_score: float | None
    final_split: str
    final_score: float | None
    final_runs: int
    status: str
    proposer: str
    best_run_id: str | None
    log_key: str | None


def leaderboard(session: Session, search_id: str, metric: Metric) -> list[LeaderboardRow]:
    runs = ranking.search_runs(session, search_id)
    logs = {r.run_id: r.log_key for r in runs}
    finals = ranking.final_results(runs)
    entries = ranking.leaderboard(session, search_id)
    final_split = metric.final_split or metric.split

    def row(rank: int | None, idea: IdeaRow, standing: Standing | None) -> LeaderboardRow:
        final = finals.get(idea.idea_id)
        best_run = standing.best_run_id if standing else None
        return LeaderboardRow(
            rank=rank,
            idea_id=idea.idea_id,
            generation=idea.generation,
            mode=idea.mode,
            title=(idea.title or "").strip(),
            split=metric.split,
            score=standing.mean_score if standing else None,
            reward=standing.mean_reward if standing else None,
            runs=standing.runs if standing else 0,
            best_run_score=standing.best_score if standing else None,
            final_split=final_split,
            final_score=final.mean_score if final else None,
            final_runs=final.runs if final else 0,
            status=idea.status,
            proposer=f"{idea.proposer_kind}:{idea.proposer_model}"
            if idea.proposer_model
            else str(idea.proposer_kind),
            best_run_id=best_run,
            log_key=logs.get(best_run) if best_run else None,
        )

    return [row(e.rank, e.idea, e.standing) for e in entries] + [
        row(None, idea, None) for idea in ranking.unranked(session, search_id, entries)
    ]


def best_so_far(session: Session, search_id: str) -> list[CurvePoint]:
    """The leader's mean search-split score after each search run that changed it, in
    completion order (final re-evaluation runs never move it)."""
    return ranking.best_so_far(ranking.search_runs(session, search_id))


def baseline_scores(session: Session, search_id: str) -> list[float]:
    """The unpatched baseline's succeeded runs on the search split."""
    return ranking.baseline_scores(ranking.search_runs(session, search_id))


def write_report(session: Session, search_id: str, out_dir: Path, metric: Metric) -> Path:
    search = session.get(SearchRow, search_id)
    if search is None:
        raise LookupError(f"no search {search_id!r} in the projections; run `groundloop searches`")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = leaderboard(session, search_id, metric)
    baseline = baseline_scores(session, search_id)
    usage = model_usage(session, search_id)
    _write_leaderboard(rows, out_dir, search, metric, baseline, usage)
    policy = rl_section(session, search_id, search.strategy, rows, out_dir)
    if policy:
        with (out_dir / "leaderboard.md").open("a") as fh:
            fh.write("\n".join(policy) + "\n")
    curve = best_so_far(session, search_id)
    _plot(curve, baseline, out_dir / "best_so_far.png", search, metric)
    if rows and rows[0].rank is not None:
        idea = session.get(IdeaRow, rows[0].idea_id)
        patch = session.get(PatchRow, idea.patch_id) if idea and idea.patch_id else None
        if patch is not None and patch.diff is not None:
            (out_dir / "best.patch").write_text(patch.diff)
    summary: dict[str, Any] = {
        "search": search.model_dump(mode="json"),
        "metric": metric.model_dump(),
        "split": metric.split,
        "final_split": metric.final_split or metric.split,
        "baseline_scores": baseline,
        "best_so_far": [
            {"split": metric.split, **{k: v for k, v in p.__dict__.items() if k != "completed_at"}}
            for p in curve
        ],
        "leaderboard": [r.__dict__ for r in rows[:20]],
        "model_usage": usage.__dict__,
        "policy": [p.model_dump(mode="json") for p in policy_rows(session, search_id)],
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return out_dir


CSV_COLUMNS = [f.name for f in fields(LeaderboardRow)]


def _write_leaderboard(
    rows: list[LeaderboardRow],
    out_dir: Path,
    search: SearchRow,
    metric: Metric,
    baseline: list[float],
    usage: ModelUsage,
) -> None:
    with (out_dir / "leaderboard.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow(r.__dict__)
    final_split = metric.final_split or metric.split
    base = (
        f"{_fmt(sum(baseline) / len(baseline))} (mean of {_runs(len(baseline))})"
        if baseline
        else "-"
    )
    top = rows[0] if rows and rows[0].rank is not None else None
    best = f"{_fmt(top.score)} (mean of {_runs(top.runs)})" if top else "-"
    lines = [
        f"# {search.search_id}: {search.environment} ({search.strategy})",
        "",
        f"Status: {search.status} ({search.completion_reason or 'running'}). Metric: {metric.name}, "
        f"{'lower' if metric.direction == 'minimize' else 'higher'} is better.",
        "",
        f"- search split `{metric.split}`: baseline {base}, best idea {best}",
        f"- final re-evaluation on `{final_split}`: baseline {_fmt(search.baseline_score)}, "
        f"best idea {_fmt(search.best_score)}",
        f"- model calls: {usage.input_tokens:,} input + {usage.output_tokens:,} output tokens, "
        f"${usage.cost_usd:.4f}",
        "",
        f"Leaderboard: each idea's mean score over its succeeded runs on `{metric.split}` (runs: "
        f"how many), ranked by mean reward. Final re-evaluation runs on `{final_split}` are not "
        "part of it (see below).",
        "",
        f"| rank | generation | mode | mean {metric.name} on `{metric.split}` | runs | "
        "status | proposer | idea | log |",
        "|---:|---:|---|---:|---:|---|---|---|---|",
    ]
    for r in rows:
        title = _cell(r.title, 120)
        log = f"logs/{r.best_run_id}.log" if r.best_run_id else "-"
        lines.append(
            f"| {r.rank or '-'} | {r.generation} | {r.mode} | {_fmt(r.score)} | {r.runs} | "
            f"{r.status} | {r.proposer} | {title} | {log} |"
        )
    if search.final:
        titles = {r.idea_id: _cell(r.title, 80) for r in rows}
        lines += [
            "",
            f"## Final re-evaluation on `{final_split}` (mean ± 95 % CI, Welch p vs baseline)",
            "",
            f"| idea | {metric.name} on `{final_split}` per run | runs | mean | 95 % CI | p |",
            "|---|---|---:|---:|---|---:|",
        ]
        for f in search.final:
            scores = ", ".join(_fmt(s) for s in f["scores"])
            idea = titles.get(f["idea_id"], f["idea_id"][:8])
            lines.append(
                f"| {idea} | {scores} | {len(f['scores'])} | {_fmt(f['mean'])} | "
                f"[{_fmt(f['ci95_low'])}, {_fmt(f['ci95_high'])}] | {_fmt(f.get('p_value_vs_baseline'))} |"
            )
    (out_dir / "leaderboard.md").write_text("\n".join(lines) + "\n")


def _plot(
    curve: list[CurvePoint], baseline: list[float], path: Path, search: SearchRow, metric: Metric
) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        path.with_suffix(".txt").write_text(
            "matplotlib is not installed: pip install 'groundloop[report]'\n"
        )
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    if curve:
        # A step: the leader holds until the run that changes it.
        ax.step(
            [p.position for p in curve],
            [p.mean_score for p in curve],
            where="post",
            marker="o",
            label="best idea so far (mean)",
        )
    if baseline:
        mean = sum(baseline) / len(baseline)
        ax.axhline(mean, color="grey", linestyle="--", label=f"baseline ({len(baseline)} runs)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("search runs completed")
    ax.set_ylabel(f"{metric.name} on {metric.split}")
    ax.set_title(f"{search.environment}: {search.strategy}")
    if curve or baseline:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _runs(n: int) -> str:
    return f"{n} run" if n == 1 else f"{n} runs"


def _cell(text: str, width: int) -> str:
    """Text safe inside one Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")[:width]


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.4g}"
