"""An idea turned into a patch by a language model, with self-revision and parallel samples.

The model sees the idea, the environment's description and editable files (protected files
are named with a notice, never shown) and the rules. It answers with a unified diff or with
SEARCH/REPLACE blocks. Each answer is checked by `check(diff)` (strict apply + pre-flight);
on an error the model sees the error and revises, up to `revisions` times. `samples`
conversations run in parallel threads and the first whose patch passes wins; the others stop
after their current step (their smoke runs are killed through groundloop.execution.sandbox.cancel_on).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Literal

from groundloop.execution.applier import PatchRejected, search_replace_to_diff
from groundloop.execution.environment import Environment
from groundloop.events import Usage
from groundloop.llm.client import LLMClient, LLMError
from groundloop.llm.pricing import add_usage
from groundloop.execution.sandbox import cancel_on

log = logging.getLogger(__name__)

Stage = Literal["model", "apply", "preflight"]
ERROR_CHARS = 4000  # of an error shown back to the model

SYSTEM = (
    "You are an expert machine-learning engineer. You implement a research idea as a minimal, "
    "correct patch to a training codebase. You only edit the editable files, you never try to "
    "change the evaluation, the data or the time limit, and your patch must apply exactly."
)

FORMAT = """Answer with the patch in ONE of these two formats (nothing else is applied):

1. A unified diff in a ```diff block, against the files exactly as shown:
```diff
--- a/{file}
+++ b/{file}
@@ -10,7 +10,7 @@
 unchanged context line
-old line
+new line
 unchanged context line
```
Context lines must match the file exactly and the @@ line counts must be right.

2. SEARCH/REPLACE blocks, each preceded by the file's path:
{file}
<<<<<<< SEARCH
lines copied exactly from the file
=======
the replacement lines
>>>>>>> REPLACE
"""


def build_prompt(env: Environment, title: str, idea: str) -> str:
    m = env.manifest
    new_files = (
        f"New files may be created only where they match: {', '.join(m.new_files)}."
        if m.new_files
        else "Do not create new files."
    )
    rules = [
        f"- Edit only these files: {', '.join(m.editable)}. {new_files}",
        "- Protected files (the evaluation, the data, the manifest with the time limit) are hidden "
        "from you; any edit to them is rejected. Do not try to work around the evaluation.",
        f"- Every run has a hard wall-clock budget of {m.budget.wall_seconds:g} s; the change must "
        "keep training inside it. A quick smoke run (GROUNDLOOP_SMOKE=1) must still pass.",
        "- Keep the change focused on the idea; do not reformat unrelated code.",
    ]
    return (
        "\n".join(
            [
                env.describe_for_prompt().rstrip(),
                "",
                "## The idea to implement",
                f"{title}",
                "",
                idea.strip(),
                "",
                "## Rules",
                *rules,
                "",
                FORMAT.format(file=m.editable[0]),
            ]
        )
        + "\n"
    )


def revision_prompt(stage: Stage, error: str) -> str:
    what = "could not be applied" if stage == "apply" else "applied but failed pre-flight"
    if len(error) > ERROR_CHARS:
        error = error[: ERROR_CHARS // 2] + "\n…\n" + error[-ERROR_CHARS // 2 :]
    return (
        f"Your patch {what}:\n\n{error}\n\nWrite a corrected, complete patch against the "
        "ORIGINAL files shown above (not on top of your previous attempt), in the same format."
    )


_FENCE = re.compile(r"```[ \t]*(?:diff|patch|udiff)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_patch(text: str, sources: dict[str, str]) -> str:
    """The unified diff in a model's answer (SEARCH/REPLACE blocks are converted against
    `sources`). Raises PatchRejected, with a reason the model can act on, when there is none."""
    if re.search(r"^<{5,9} ?SEARCH\s*$", text, re.MULTILINE):
        return search_replace_to_diff(sources, text)
    fenced = [
        block for block in _FENCE.findall(text) if re.search(r"^(?:--- |@@ )", block, re.MULTILINE)
    ]
    diff = "\n".join(block.rstrip("\n") for block in fenced) + "\n" if fenced else text
    if not re.search(r"^--- ", diff, re.MULTILINE) or not re.search(r"^@@ ", diff, re.MULTILINE):
        raise PatchRejected(
            "no unified diff (--- / +++ / @@ lines) and no SEARCH/REPLACE block "
            "found in your answer"
        )
    return diff


@dataclass(frozen=True)
class Verdict:
    """What `check` says about one candidate diff."""

    passed: bool
    stage: Stage | None = None
    error: str = ""
    result: object = None  # whatever the caller needs back from a passing check


@dataclass
class SampleResult:
    sample: int
    attempts: int = 0  # candidate patches checked
    calls: int = 0
    usage: Usage = field(default_factory=Usage)
    verdict: Verdict | None = None  # the last one
    model_error: LLMError | None = None


def run_sample(
    client: LLMClient,
    prompt: str,
    sources: dict[str, str],
    check: Callable[[str], Verdict],
    *,
    sample: int,
    revisions: int,
    cancel: threading.Event,
) -> SampleResult:
    out = SampleResult(sample)
    messages = [{"role": "user", "content": prompt}]
    for revision in range(revisions + 1):
        if cancel.is_set():
            break
        try:
            completion = client.complete(messages, system=SYSTEM)
        except LLMError as exc:
            out.model_error = exc
            break
        out.calls += 1
        out.usage = add_usage(out.usage, completion.usage)
        try:
            diff = extract_patch(completion.text, sources)
            verdict = check(diff)
        except PatchRejected as exc:
            verdict = Verdict(False, "apply", exc.reason)
        out.attempts += 1
        out.verdict = verdict
        if verdict.passed:
            return out
        log.info(
            "sample %d revision %d: %s failed: %s",
            sample,
            revision,
            verdict.stage,
            verdict.error.splitlines()[0][:200] if verdict.error else "",
        )
        messages += [
            {"role": "assistant", "content": completion.text},
            {"role": "user", "content": revision_prompt(verdict.stage or "apply", verdict.error)},
        ]
    return out


def implement(
    client: LLMClient,
    prompt: str,
    sources: dict[str, str],
    check: Callable[[str], Verdict],
    *,
    samples: int,
    revisions: int,
) -> tuple[SampleResult | None, list[SampleResult]]:
    """Run `samples` conversations in parallel; (the winner or None, every sample's result)."""
    cancel = threading.Event()

    def one(sample: int) -> SampleResult:
        with cancel_on(cancel):
            return run_sample(
                client, prompt, sources, check, sample=sample, revisions=revisions, cancel=cancel
            )

    winner: SampleResult | None = None
    results: list[SampleResult] = []
    with ThreadPoolExecutor(
        max_workers=max(samples, 1), thread_name_prefix="implementer-sample"
    ) as pool:
        for future in as_completed([pool.submit(one, i) for i in range(max(samples, 1))]):
            result = future.result()
            results.append(result)
            if winner is None and result.verdict is not None and result.verdict.passed:
                winner = result
                cancel.set()  # the others stop after their current step
    return winner, sorted(results, key=lambda r: r.sample)


def best_failure(results: list[SampleResult]) -> tuple[Stage, str]:
    """The failure to report: the one that got furthest (pre-flight > apply > model)."""
    order = {"preflight": 2, "apply": 1}
    verdicts = [r.verdict for r in results if r.verdict is not None]
    if verdicts:
        last = max(verdicts, key=lambda v: order.get(v.stage or "", 0))
        return last.stage or "apply", last.error
    errors = [str(r.model_error) for r in results if r.model_error is not None]
    return "model", errors[-1] if errors else "the model produced no answer"
