"""The ideator's prompts, after the paper's: the environment (description and editable code,
protected files replaced by a notice), the mode's context ideas, the ideas already written
this generation, and the output format.

- fresh (generation 0): brainstorm new ideas;
- explore: here is what was tried (including what failed); propose substantially different ideas;
- exploit: these ideas beat the baseline (with scores); combine or refine them.
"""

from __future__ import annotations

import hashlib

from groundloop.ideator.history import IdeaRecord
from groundloop.manifest import Metric

SYSTEM = (
    "You are an experienced machine-learning research scientist. You propose concrete, "
    "testable ideas for improving a training recipe. Each idea is implemented as a code change "
    "to the editable files and measured by a protected evaluation under a fixed wall-clock "
    "budget, so ideas must fit that budget and may never touch the evaluation, the data or the "
    "time limit."
)

FORMAT = """Write each idea in exactly this format, one after another:

[Experiment] One paragraph: what to change and why it should improve {metric} ({direction}).
[Code Changes] Concrete edits to the editable files (names of functions, constants, values).
[End]"""

CONTEXT_CHARS = 600  # per context idea; 100 ideas stay well inside any model's window


def _clip(text: str, limit: int = CONTEXT_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _listing(records: list[IdeaRecord], with_outcome: bool) -> str:
    lines = []
    for i, record in enumerate(records, 1):
        outcome = f" — {record.outcome}" if with_outcome else ""
        lines.append(f"{i}. {record.title}{outcome}\n   {_clip(record.text)}")
    return "\n".join(lines)


def build_prompt(
    *,
    environment: str,
    metric: Metric,
    mode: str,
    count: int,
    context: list[IdeaRecord],
    baseline_score: float | None,
    written_this_generation: list[str],
) -> str:
    """The user message asking for `count` ideas in `mode`."""
    parts = [environment.rstrip(), ""]
    better = "lower" if metric.direction == "minimize" else "higher"
    base = (
        f"The unmodified baseline scores {metric.name} = {baseline_score:.6g}. "
        if baseline_score is not None
        else ""
    )
    if mode == "exploit" and context:
        parts += [
            f"{base}These ideas beat the baseline ({metric.name}, {better} is better):",
            _listing(context, with_outcome=True),
            "",
            f"Propose {count} new ideas that combine or refine the ideas above to improve "
            f"{metric.name} further. Say which ideas each one builds on.",
        ]
    elif mode == "explore" and context:
        parts += [
            f"{base}These ideas were already tried, with their results (some failed):",
            _listing(context, with_outcome=True),
            "",
            f"Propose {count} new ideas that are substantially different from every idea "
            f"above: different mechanisms, not variations of the same change.",
        ]
    else:
        parts += [
            f"{base}Brainstorm {count} diverse ideas that should improve {metric.name} "
            f"({better} is better) within the budget.",
        ]
    if written_this_generation:
        parts += ["", "Ideas already written in this round (do not repeat them):"]
        parts += [f"- {title}" for title in written_this_generation]
    parts += ["", FORMAT.format(metric=metric.name, direction=f"{better} is better")]
    return "\n".join(parts) + "\n"


def prompt_digest(system: str, prompt: str) -> str:
    return hashlib.sha256(f"{system}\n\n{prompt}".encode()).hexdigest()
