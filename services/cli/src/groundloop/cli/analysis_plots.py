"""The figures of `groundloop analyze`, each with one line per search so several searches
compare side by side (matplotlib, headless):

    execution_rate.png   valid runs ÷ ideas per generation
    idea_classes.png     share of hyper-parameter ideas per generation (by patch; by the LLM
                         judge, dashed, when one was asked)
    diversity.png        mean pairwise similarity of idea texts, and distinct-idea fraction
    scores.png           best (solid) and mean (dashed) idea score per generation, baseline dotted
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

PLOTS = ("execution_rate.png", "idea_classes.png", "diversity.png", "scores.png")


def write_plots(analyses: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Write every figure for `analyses` (analyze_events results) into `out_dir`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    def figure(name: str, panels: int, draw: Callable[[Any, int], None]) -> Path:
        fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
        for n, ax in enumerate(axes[0]):
            draw(ax, n)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("generation")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize="small")
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def series(a: dict[str, Any], key: str, sub: str | None = None) -> tuple[list, list]:
        xs, ys = [], []
        for row in a["generations"]:
            value = row.get(key)
            if sub is not None:
                value = value.get(sub) if isinstance(value, dict) else None
            if value is not None:
                xs.append(row["generation"])
                ys.append(value)
        return xs, ys

    colors = [f"C{n % 10}" for n in range(len(analyses))]

    def execution(ax: Any, _: int) -> None:
        for a, color in zip(analyses, colors, strict=True):
            ax.plot(*series(a, "execution_rate"), marker="o", color=color, label=a["search_id"])
        ax.set_ylim(-0.05, 1.05)
        ax.set_ylabel("ideas with a valid run ÷ ideas")
        ax.set_title("execution rate")

    def classes(ax: Any, _: int) -> None:
        for a, color in zip(analyses, colors, strict=True):
            xs, ys = series(a, "classes", "hyperparameter_share")
            ax.plot(xs, ys, marker="o", color=color, label=f"{a['search_id']} (patch)")
            xs, ys = series(a, "judge_classes", "hyperparameter_share")
            if xs:
                ax.plot(
                    xs,
                    ys,
                    marker="x",
                    linestyle="--",
                    color=color,
                    label=f"{a['search_id']} (judge)",
                )
        ax.set_ylim(-0.05, 1.05)
        ax.set_ylabel("hyper-parameter share (rest: algorithmic)")
        ax.set_title("hyper-parameter vs algorithmic ideas")

    def diversity(ax: Any, panel: int) -> None:
        key, label = [
            ("mean_similarity", "mean pairwise similarity"),
            ("distinct_fraction", "distinct ideas ÷ ideas"),
        ][panel]
        for a, color in zip(analyses, colors, strict=True):
            ax.plot(*series(a, key), marker="o", color=color, label=a["search_id"])
        ax.set_ylabel(label)
        if panel == 1:
            ax.set_ylim(-0.05, 1.05)  # a fraction: a flat 1.0 must not look like noise
        measure = analyses[0]["diversity"]["measure"] if analyses else ""
        ax.set_title(f"idea similarity ({measure})" if panel == 0 else "distinct ideas")

    def scores(ax: Any, _: int) -> None:
        for a, color in zip(analyses, colors, strict=True):
            ax.plot(
                *series(a, "best_score"), marker="o", color=color, label=f"{a['search_id']} best"
            )
            ax.plot(
                *series(a, "mean_score"),
                marker=".",
                linestyle="--",
                color=color,
                label=f"{a['search_id']} mean",
            )
            if a["baseline"]["mean"] is not None:
                ax.axhline(a["baseline"]["mean"], color=color, linestyle=":", linewidth=1)
        ax.set_ylabel("idea score (mean of its runs); dotted: baseline")
        ax.set_title("best and mean score per generation")

    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        figure(PLOTS[0], 1, execution),
        figure(PLOTS[1], 1, classes),
        figure(PLOTS[2], 2, diversity),
        figure(PLOTS[3], 1, scores),
    ]
