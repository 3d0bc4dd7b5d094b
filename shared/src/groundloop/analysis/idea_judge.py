"""The paper's LLM judge of idea classes: is an idea hyper-parameter tuning or algorithmic?

Si et al. split the ideas of their searches into hyper-parameter tuning and algorithmic ideas
with a language model and report each class's share per epoch and how each class scores. The
judge asks one model call per idea, for a structured answer
{"label": "hyperparameter" | "algorithmic", "reason": "..."}, through `groundloop.llm.client`
(any provider; a local OpenAI-compatible server works).

    judge = IdeaJudge(make_client("openai-compatible:qwen@http://localhost:8000/v1"))
    verdicts = judge.classify_all([(idea_id, title, text), ...])   # idea id -> Verdict
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from groundloop.events import Usage
from groundloop.llm.client import JsonSchema, LLMClient

JUDGE_SYSTEM = (
    "You classify research ideas for improving a machine-learning training recipe, as in "
    "'Towards Execution-Grounded Automated AI Research' (Si et al.)."
)
JUDGE_PROMPT = """Classify the idea below into exactly one of two categories.

- hyperparameter: the idea only tunes the values of existing hyper-parameters or settings
  (learning rate, batch size, warmup or decay steps, weight decay, number of steps, model
  width or depth, sampling temperature, group size, ...) without changing how the training
  algorithm, model, loss, optimizer or data pipeline works.
- algorithmic: the idea changes or adds a method: a new or modified architecture component,
  loss, optimizer, schedule shape, regularisation technique, data processing, sampling or
  training procedure, i.e. anything that needs new code logic rather than new values.

An idea that mixes both is algorithmic.

Idea:
{idea}

Answer with JSON: {{"label": "hyperparameter" or "algorithmic", "reason": "one sentence"}}."""

JUDGE_SCHEMA = JsonSchema(
    name="idea_class",
    schema={
        "type": "object",
        "properties": {
            "label": {"type": "string", "enum": ["hyperparameter", "algorithmic"]},
            "reason": {"type": "string"},
        },
        "required": ["label", "reason"],
        "additionalProperties": False,
    },
    description="The class of the research idea.",
)
JUDGE_MAX_TOKENS = 300  # a label and one sentence
_JSON_OBJECT = re.compile(r"\{.*\}", re.DOTALL)


@dataclass(frozen=True)
class Verdict:
    label: str  # "hyperparameter", "algorithmic", or "unclassified" (an unreadable answer)
    reason: str


def parse_verdict(text: str) -> Verdict:
    """The verdict in a model's answer: the JSON object, also when wrapped in prose or a
    code fence (a server that ignores structured output); "unclassified" when there is none."""
    match = _JSON_OBJECT.search(text)
    try:
        data = json.loads(match.group(0)) if match else None
    except json.JSONDecodeError:
        data = None
    label = data.get("label") if isinstance(data, dict) else None
    if label in ("hyperparameter", "algorithmic"):
        return Verdict(label, str(data.get("reason", "")).strip())  # type: ignore[union-attr]
    return Verdict("unclassified", f"the judge's answer has no label: {text.strip()[:120]!r}")


class IdeaJudge:
    """Classifies idea texts with one model; model errors (unreachable, not served, a
    missing key) propagate with the client's message: the analysis cannot honour the option."""

    def __init__(self, client: LLMClient, concurrency: int = 4):
        self.client = client
        self.concurrency = concurrency
        self.usage = Usage()
        self._lock = threading.Lock()

    @property
    def model(self) -> str:
        return self.client.spec.label

    def classify(self, title: str, text: str) -> Verdict:
        idea = text if text.lstrip().startswith(title) else f"{title}\n\n{text}"
        completion = self.client.complete(
            [{"role": "user", "content": JUDGE_PROMPT.format(idea=idea.strip())}],
            system=JUDGE_SYSTEM,
            max_tokens=JUDGE_MAX_TOKENS,
            response_format=JUDGE_SCHEMA,
        )
        with self._lock:
            u = self.usage
            self.usage = Usage(
                calls=u.calls + 1,
                input_tokens=u.input_tokens + completion.usage.input_tokens,
                output_tokens=u.output_tokens + completion.usage.output_tokens,
                cost_usd=u.cost_usd + completion.usage.cost_usd,
            )
        return parse_verdict(completion.text)

    def classify_all(self, ideas: Sequence[tuple[str, str, str]]) -> dict[str, Verdict]:
        """(idea id, title, text) -> verdict per idea id; calls run a few at a time."""
        with ThreadPoolExecutor(max_workers=max(1, self.concurrency)) as pool:
            verdicts = list(pool.map(lambda idea: self.classify(idea[1], idea[2]), ideas))
        return {idea[0]: verdict for idea, verdict in zip(ideas, verdicts, strict=True)}
