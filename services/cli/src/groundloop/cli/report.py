"""A search's report folder, written from the projections (so it can be re-written any time).

leaderboard.md / leaderboard.csv   ideas ranked by best reward (reward is higher-is-better)
best_so_far.png                    best score vs generation (needs matplotlib: the `report` extra)
best.patch                         the best idea's diff
summary.json                       the search row, final re-evaluation, totals, baseline
logs/<run_id>.log                  logs of the best runs, fetched by the caller (see search_job)
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlmodel import Session, col, select

from groundloop.api.store import GenerationRow, IdeaRow, PatchRow, RunRow, SearchRow
from groundloop.manifest import Metric


@dataclass(frozen=True)
class LeaderboardRow:
    rank: int
    idea_id: str
    generation: int | None
    mode: str | None
    title: str
    score: float | None
    reward: float | None
    runs: int
    status: str
    proposer: str
    best_run_id: str | None
    log_key: str | None


def leaderboard(session: Session, search_id: str) -> list[LeaderboardRow]:
    ideas = session.exec(select(IdeaRow).where(IdeaRow.search_id == search_id)).all()
    runs = {r.run_id: r for r in session.exec(select(RunRow).where(RunRow.search_id == search_id))}

    def key(idea: IdeaRow) -> tuple:
        return (
            idea.best_reward is None,
            -(idea.best_reward or 0.0),
            idea.generation or 0,
            idea.idea_id,
        )

    rows = []
    for rank, idea in enumerate(sorted(ideas, key=key), start=1):
        best = runs.get(idea.best_run_id or "")
        rows.append(
            LeaderboardRow(
                rank,
                idea.idea_id,
                idea.generation,
                idea.mode,
                (idea.title or "").strip(),
                idea.best_score,
                idea.best_reward,
                idea.runs_completed,
                idea.status,
                f"{idea.proposer_kind}:{idea.proposer_model}"
                if idea.proposer_model
                else str(idea.proposer_kind),
                idea.best_run_id,
                best.log_key if best else None,
            )
        )
    return rows


def best_so_far(session: Session, search_id: str, direction: str) -> list[tuple[int, float]]:
    """(generation, best score among ideas of generations ≤ g) for every generation with a score."""
    gens = session.exec(
        select(GenerationRow)
        .where(GenerationRow.search_id == search_id)
        .order_by(col(GenerationRow.generation))
    ).all()
    ideas = session.exec(select(IdeaRow).where(IdeaRow.search_id == search_id)).all()
    better = min if direction == "minimize" else max
    out, best = [], None
    for gen in gens:
        scores = [
            i.best_score
            for i in ideas
            if i.generation == gen.generation and i.best_score is not None
        ]
        if scores:
            best = better([*scores, best]) if best is not None else better(scores)
        if best is not None:
            out.append((gen.generation, best))
    return out


def baseline_scores(session: Session, search_id: str) -> list[float]:
    runs = session.exec(
        select(RunRow).where(
            RunRow.search_id == search_id,
            RunRow.purpose == "baseline",
            RunRow.status == "succeeded",
        )
    ).all()
    return [r.score for r in runs if r.score is not None]


def write_report(session: Session, search_id: str, out_dir: Path, metric: Metric) -> Path:
    search = session.get(SearchRow, search_id)
    if search is None:
        raise LookupError(f"no search {search_id!r} in the projections; run `groundloop searches`")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = leaderboard(session, search_id)
    baseline = baseline_scores(session, search_id)
    _write_leaderboard(rows, out_dir, search, metric, baseline)
    curve = best_so_far(session, search_id, metric.direction)
    _plot(curve, baseline, out_dir / "best_so_far.png", search)
    if rows and rows[0].reward is not None:
        idea = session.get(IdeaRow, rows[0].idea_id)
        patch = session.get(PatchRow, idea.patch_id) if idea and idea.patch_id else None
        if patch is not None and patch.diff is not None:
            (out_dir / "best.patch").write_text(patch.diff)
    summary: dict[str, Any] = {
        "search": search.model_dump(mode="json"),
        "metric": metric.model_dump(),
        "baseline_scores": baseline,
        "best_so_far": curve,
        "leaderboard": [r.__dict__ for r in rows[:20]],
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return out_dir


def _write_leaderboard(
    rows: list[LeaderboardRow],
    out_dir: Path,
    search: SearchRow,
    metric: Metric,
    baseline: list[float],
) -> None:
    with (out_dir / "leaderboard.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            [
                "rank",
                "idea_id",
                "generation",
                "mode",
                "score",
                "reward",
                "runs",
                "status",
                "proposer",
                "title",
                "best_run_id",
                "log_key",
            ]
        )
        for r in rows:
            writer.writerow(
                [
                    r.rank,
                    r.idea_id,
                    r.generation,
                    r.mode,
                    r.score,
                    r.reward,
                    r.runs,
                    r.status,
                    r.proposer,
                    r.title,
                    r.best_run_id,
                    r.log_key,
                ]
            )
    final_split = metric.final_split or metric.split
    base = f"{_fmt(sum(baseline) / len(baseline))} ({len(baseline)} seeds)" if baseline else "-"
    lines = [
        f"# {search.search_id}: {search.environment} ({search.strategy})",
        "",
        f"Status: {search.status} ({search.completion_reason or 'running'}). Metric: {metric.name}, "
        f"{'lower' if metric.direction == 'minimize' else 'higher'} is better.",
        "",
        f"- search split `{metric.split}`: baseline {base}, best idea {_fmt(rows[0].score if rows else None)}",
        f"- final re-evaluation on `{final_split}`: baseline {_fmt(search.baseline_score)}, "
        f"best idea {_fmt(search.best_score)}",
        "",
        f"Leaderboard (best score of each idea on `{metric.split}`):",
        "",
        "| rank | generation | mode | score | runs | status | proposer | idea | log |",
        "|---:|---:|---|---:|---:|---|---|---|---|",
    ]
    for r in rows:
        title = _cell(r.title, 120)
        log = f"logs/{r.best_run_id}.log" if r.best_run_id else "-"
        lines.append(
            f"| {r.rank} | {r.generation} | {r.mode} | {_fmt(r.score)} | {r.runs} | "
            f"{r.status} | {r.proposer} | {title} | {log} |"
        )
    if search.final:
        titles = {r.idea_id: _cell(r.title, 80) for r in rows}
        lines += [
            "",
            f"## Final re-evaluation on `{final_split}` (mean ± 95 % CI, Welch p vs baseline)",
            "",
            "| idea | scores | mean | 95 % CI | p |",
            "|---|---|---:|---|---:|",
        ]
        for f in search.final:
            scores = ", ".join(_fmt(s) for s in f["scores"])
            idea = titles.get(f["idea_id"], f["idea_id"][:8])
            lines.append(
                f"| {idea} | {scores} | {_fmt(f['mean'])} | "
                f"[{_fmt(f['ci95_low'])}, {_fmt(f['ci95_high'])}] | {_fmt(f.get('p_value_vs_baseline'))} |"
            )
    (out_dir / "leaderboard.md").write_text("\n".join(lines) + "\n")


def _plot(
    curve: list[tuple[int, float]], baseline: list[float], path: Path, search: SearchRow
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
        ax.plot([g for g, _ in curve], [s for _, s in curve], marker="o", label="best so far")
    if baseline:
        mean = sum(baseline) / len(baseline)
        ax.axhline(mean, color="grey", linestyle="--", label=f"baseline ({len(baseline)} seeds)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("generation")
    ax.set_ylabel("score")
    ax.set_title(f"{search.environment}: {search.strategy}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _cell(text: str, width: int) -> str:
    """Text safe inside one Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")[:width]


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.4g}"
