"""The ideator's prompts, after the paper's (shared: the LLM ideator and the rl-trainer's
language-model policies ask in the same words): the environment (description and editable code,
protected files replaced by a notice), the mode's context ideas, the ideas already written
this generation, and the output format.

- fresh (generation 0): brainstorm new ideas;
- explore: here is what was tried (including what failed); propose substantially different ideas;
- exploit: these ideas beat the baseline (with scores); combine or refine them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Protocol

from groundloop.llm.structured import JsonSchema
from groundloop.manifest import Metric

SYSTEM = (
    "You are an experienced machine-learning research scientist. You propose concrete, "
    "testable ideas for improving a training recipe. Each idea is implemented as a code change "
    "to the editable files and measured by a protected evaluation under a fixed wall-clock "
    "budget, so ideas must fit that budget and may never touch the evaluation, the data or the "
    "time limit."
)

# Described in words, with no fill-in line a model could copy as an idea (a 1.5B model
# returned the old template's placeholder text as its idea); parsing.TEMPLATE_PHRASES still
# rejects an idea made of these descriptions.
FORMAT = """Write the ideas one after another. Each idea has three parts, each starting on a new line:
- the marker [Experiment], then one paragraph: what to change and why it should improve \
{metric} ({direction});
- the marker [Code Changes], then the concrete edits to the editable files: the names of the \
functions and constants to change and their new values;
- the marker [End].
Write the markers exactly as shown, in square brackets, without Markdown."""

FORMAT_JSON = """Answer with a JSON object {{"ideas": [...]}} holding {count} ideas, each an object \
with "title" (a few words), "experiment" (one paragraph: what to change and why it should \
improve {metric}, {direction}) and "code_changes" (the concrete edits to the editable files)."""


class ContextIdea(Protocol):
    """What a prompt shows of an earlier idea (the ideator's IdeaRecord is one)."""

    @property
    def title(self) -> str: ...
    @property
    def text(self) -> str: ...
    @property
    def outcome(self) -> str: ...


CONTEXT_CHARS = 600  # per context idea; 100 ideas stay well inside any model's window


def _clip(text: str, limit: int = CONTEXT_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _listing(records: Sequence[ContextIdea], with_outcome: bool) -> str:
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
    context: Sequence[ContextIdea],
    baseline_score: float | None,
    written_this_generation: list[str],
    structured: bool = False,
) -> str:
    """The user message asking for `count` ideas in `mode`; `structured`: the answer comes as
    JSON (the call passes `idea_schema()` as its response format)."""
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
    template = FORMAT_JSON if structured else FORMAT
    direction = f"{better} is better"
    parts += ["", template.format(metric=metric.name, direction=direction, count=count)]
    return "\n".join(parts) + "\n"


def prompt_digest(system: str, prompt: str) -> str:
    return hashlib.sha256(f"{system}\n\n{prompt}".encode()).hexdigest()


def idea_schema(max_ideas: int | None = None) -> JsonSchema:
    """Structured output for ideas: pass as `client.complete(..., response_format=...)`
    (OpenAI-compatible: response_format json_schema; Anthropic: a forced tool). The answer
    parses with parsing.parse_ideas like any other."""
    ideas: dict = {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {
                "title": {"type": "string", "description": "a few words naming the idea"},
                "experiment": {
                    "type": "string",
                    "description": "one paragraph: what to change and why it should help",
                },
                "code_changes": {
                    "type": "string",
                    "description": "the concrete edits to the editable files",
                },
            },
            "required": ["title", "experiment", "code_changes"],
            "additionalProperties": False,
        },
    }
    if max_ideas is not None:  # OpenAI's strict mode refuses maxItems; others honour it
        ideas["description"] = f"at most {max_ideas} ideas"
    return JsonSchema(
        "ideas",
        {
            "type": "object",
            "properties": {"ideas": ideas},
            "required": ["ideas"],
            "additionalProperties": False,
        },
        "Record the proposed research ideas.",
    )
