"""`groundloop analyze SEARCH [SEARCH…]`: read each search's events from the log, analyse
them (groundloop.analysis) and write a folder:

    analysis.md      per search: execution rate and failure reasons, hyper-parameter vs
                     algorithmic ideas (by patch, and by the LLM judge with --judge-model),
                     diversity, best and mean score per generation; a side-by-side table
    analysis.json    the same numbers, one analyze_events() dict per search
    *.png            analysis_plots.PLOTS, one line per search

Works on live, finished, forked and imported searches alike (the log is the only input).
`analyze_searches` is the job; tests call it directly.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from groundloop.analysis.diversity import DiversityError, SimilarityMeasure, choose_measure
from groundloop.analysis.from_log import analyze_logged
from groundloop.analysis.idea_judge import IdeaJudge
from groundloop.bus import Bus
from groundloop.cli.analysis_plots import write_plots
from groundloop.cli.history_error import HistoryError
from groundloop.settings import Settings

console = Console()


async def analyze_searches(
    settings: Settings,
    search_ids: Sequence[str],
    *,
    measure: SimilarityMeasure | None = None,
    judge: IdeaJudge | None = None,
) -> list[dict[str, Any]]:
    """One analysis dict per search, read from the log (HistoryError if a search has no
    events) by the library the API serves too (groundloop.analysis.from_log); patches are
    classified against the environment's files when it is installed here, by their diff's
    lines otherwise (the dict's "class_basis" says which)."""
    out = []
    bus = await Bus.connect(settings, "cli-analyze")
    try:
        for search_id in search_ids:
            analysis = await analyze_logged(bus, settings, search_id, measure=measure, judge=judge)
            if analysis is None:
                raise HistoryError(
                    f"no events for search {search_id!r} in stream {settings.stream}; "
                    "`groundloop searches` lists the searches"
                )
            out.append(analysis)
    finally:
        await bus.close()
    return out


# ---------------------------------------------------------------------------- the folder


def write_analysis(analyses: Sequence[dict[str, Any]], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "analysis.json").write_text(json.dumps(list(analyses), indent=2, default=str))
    plots = write_plots(analyses, out_dir)
    lines = [f"# Analysis of {', '.join(a['search_id'] for a in analyses)}", ""]
    if analyses:
        diversity = analyses[0]["diversity"]
        lines += [f"Idea similarity: {diversity['measure']}."]
        if diversity["note"]:
            lines += ["", f"Note: {diversity['note']}."]
        lines += [""]
    if len(analyses) > 1:
        lines += _side_by_side(analyses)
    for a in analyses:
        lines += _search_section(a)
    lines += ["## Figures", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    (out_dir / "analysis.md").write_text("\n".join(lines) + "\n")
    return out_dir


def _side_by_side(analyses: Sequence[dict[str, Any]]) -> list[str]:
    lines = [
        "## Side by side",
        "",
        "| search | environment | proposer | ideas | execution rate | hyper-parameter share | "
        "mean similarity | distinct | best score | baseline |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for a in analyses:
        c = a["classes"]
        classified = c["hyperparameter"]["ideas"] + c["algorithmic"]["ideas"]
        best = max(
            (g for g in a["generations"] if g["best_reward"] is not None),
            key=lambda g: g["best_reward"],
            default=None,
        )
        lines.append(
            f"| {a['search_id']} | {a['environment']} | {a['proposer']} | {a['totals']['ideas']} | "
            f"{_f(a['totals']['execution_rate'])} | "
            f"{_f(c['hyperparameter']['ideas'] / classified if classified else None)} | "
            f"{_f(a['diversity']['mean_similarity'])} | {_f(a['diversity']['distinct_fraction'])} | "
            f"{_f(best['best_score'] if best else None)} | {_f(a['baseline']['mean'])} |"
        )
    return [*lines, ""]


def _search_section(a: dict[str, Any]) -> list[str]:
    t, c, metric = a["totals"], a["classes"], a.get("metric")
    better = (
        f" ({metric['name']}, {'lower' if metric['direction'] == 'minimize' else 'higher'} is better)"
        if metric
        else ""
    )
    failures = ", ".join(f"{k}: {v}" for k, v in t["failures"].items()) or "none"
    lines = [
        f"## {a['search_id']}: {a['environment']} ({a['strategy']}, proposer {a['proposer']}), {a['status']}",
        "",
        f"- ideas: {t['ideas']}, with a valid run: {t['valid']}, pending: {t['pending']}; "
        f"execution rate {_f(t['execution_rate'])}",
        f"- why ideas have no valid run: {failures}",
        f"- baseline score{better}: {_f(a['baseline']['mean'])} (mean of {_runs(len(a['baseline']['scores']))})",
        f"- classes by patch (read from {a.get('class_basis', 'the diff')}): "
        + "; ".join(_class_text(k, v) for k, v in c.items() if v["ideas"]),
    ]
    judge = a["judge"]
    if judge:
        lines.append(
            f"- classes by the LLM judge {judge['model']}: "
            + "; ".join(_class_text(k, v) for k, v in judge["classes"].items() if v["ideas"])
            + f"; agrees with the patch on {_f(judge['agreement'])} of {judge['compared']} ideas "
            f"({judge['usage']['calls']} calls, ${judge['usage']['cost_usd']:.4f})"
        )
    else:
        lines.append("- LLM judge: not asked (--judge-model MODEL asks one)")
    d = a["diversity"]
    lines += [
        f"- all ideas: mean pairwise similarity {_f(d['mean_similarity'])}, distinct fraction "
        f"{_f(d['distinct_fraction'])}",
        "",
        "| generation | ideas | valid | execution rate | failures | hyper-param / algorithmic"
        + (" (judge)" if judge else "")
        + " | score hyper-param | score algorithmic | similarity | distinct | best | mean | best so far |",
        "|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for g in a["generations"]:
        share = f"{g['classes']['hyperparameter']} / {g['classes']['algorithmic']}"
        if g["judge_classes"]:
            share += (
                f" ({g['judge_classes']['hyperparameter']} / {g['judge_classes']['algorithmic']})"
            )
        failures = ", ".join(f"{k}: {v}" for k, v in g["failures"].items()) or "-"
        lines.append(
            f"| {g['generation']} | {g['ideas']} | {g['valid']} | {_f(g['execution_rate'])} | "
            f"{failures} | {share} | {_f(g['class_scores']['hyperparameter'])} | "
            f"{_f(g['class_scores']['algorithmic'])} | {_f(g['mean_similarity'])} | "
            f"{_f(g['distinct_fraction'])} | {_f(g['best_score'])} | {_f(g['mean_score'])} | "
            f"{_f(g['best_so_far_score'])} |"
        )
    return [*lines, ""]


def _class_text(label: str, stats: dict[str, Any]) -> str:
    return (
        f"{label} {stats['ideas']} ideas, {stats['valid']} valid, mean score "
        f"{_f(stats['mean_score'])}, best {_f(stats['best_score'])}"
    )


def _runs(n: int) -> str:
    return f"{n} run" if n == 1 else f"{n} runs"


def _f(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.4g}"


def default_output(settings: Settings, search_ids: Sequence[str]) -> Path:
    name = "+".join(search_ids)
    if len(name) > 100:
        name = (
            f"{search_ids[0]}+{len(search_ids) - 1}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
        )
    return settings.data_dir / "analysis" / name


# ---------------------------------------------------------------------------- the command


def register(app: typer.Typer) -> None:
    from groundloop.cli.main import connected_settings, run_async

    @app.command("analyze")
    def analyze(
        searches: Annotated[list[str], typer.Argument(help="search ids; several: side by side")],
        output: Annotated[
            Path | None,
            typer.Option("--output", "-o", help="folder; default <data dir>/analysis/<ids>"),
        ] = None,
        judge_model: Annotated[
            str | None,
            typer.Option(help="also classify ideas with this model (provider:model[@url])"),
        ] = None,
        embedding_model: Annotated[
            str | None,
            typer.Option(
                help="idea similarity: wordllama (default when installed), tfidf, or the folder "
                "of a sentence-transformers or model2vec model"
            ),
        ] = None,
    ) -> None:
        """Execution rate, hyper-parameter vs algorithmic ideas, diversity and scores per
        generation; writes analysis.md, analysis.json and plots."""
        from groundloop.llm.client import LLMError, LLMSettings, make_client

        settings = Settings()
        try:
            measure = choose_measure(embedding_model)
            judge = IdeaJudge(make_client(judge_model, LLMSettings())) if judge_model else None
        except (DiversityError, LLMError) as exc:
            console.print(f"[red]{exc}[/]")
            raise typer.Exit(2) from None
        result: list = []
        with connected_settings(settings) as s:

            async def go() -> None:
                result.append(await analyze_searches(s, searches, measure=measure, judge=judge))

            try:
                run_async(go())
            except (HistoryError, LLMError) as exc:
                console.print(f"[red]{exc}[/]")
                raise typer.Exit(2) from None
        out = write_analysis(result[0], output or default_output(settings, searches))
        console.print(f"wrote {out / 'analysis.md'} and its plots")
        sys.stdout.flush()
