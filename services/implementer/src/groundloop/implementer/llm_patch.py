"""An idea turned into a patch by a language model, with self-revision and parallel samples.

The model sees the idea, the environment's description and editable files (protected files
are named with a notice, never shown) and the rules, and answers in the edit format chosen
for it (`groundloop.implementer.edit_formats`: a unified diff, SEARCH/REPLACE blocks or whole
files; `default_edit_format` picks by model strength). Each answer becomes a diff checked by
`check(diff)` (strict apply + pre-flight); on an error the model sees the error, with the
file's real lines around what it got wrong, and revises, up to `revisions` times. An answer
that repeats an earlier one, echoes the prompt's example, is cut off or has no edit moves the
conversation to the next format (diff -> search/replace -> whole file); a repeat with no
format left ends it. `samples` conversations run in parallel threads and the first whose patch
passes wins; the others stop after their current step (their smoke runs are killed through
groundloop.execution.sandbox.cancel_on).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Literal

from groundloop.events import Usage
from groundloop.execution.applier import PatchRejected
from groundloop.execution.environment import Environment
from groundloop.execution.sandbox import cancel_on
from groundloop.implementer.edit_formats import EDIT_FORMATS as EDIT_FORMATS
from groundloop.implementer.edit_formats import (
    AnswerRejected,
    EditFormat,
    extract_edit,
    fallback_order,
    format_instructions,
    nearby_real_lines,
)
from groundloop.implementer.edit_formats import default_edit_format as default_edit_format
from groundloop.llm.client import Completion, LLMClient, LLMError
from groundloop.llm.pricing import add_usage

log = logging.getLogger(__name__)

Stage = Literal["model", "apply", "preflight"]
ERROR_CHARS = 4000  # of an error shown back to the model
TRUNCATED = ("length", "max_tokens")  # OpenAI's and Anthropic's stop reasons for a cut answer

SYSTEM = (
    "You are an expert machine-learning engineer. You implement a research idea as a minimal, "
    "correct patch to a training codebase. You only edit the editable files, you never try to "
    "change the evaluation, the data or the time limit, and your patch must apply exactly."
)


def build_prompt(env: Environment, title: str, idea: str, edit_format: EditFormat = "diff") -> str:
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
                "## Answer format",
                format_instructions(edit_format, env.editable_sources()).rstrip(),
            ]
        )
        + "\n"
    )


def revision_prompt(
    stage: Stage,
    error: str,
    *,
    nearby: str = "",
    edit_format: EditFormat = "diff",
    switch_to: str | None = None,
) -> str:
    """The error, the file's real lines near what went wrong, and (when the format changes)
    the new format's instructions."""
    what = "could not be applied" if stage == "apply" else "applied but failed pre-flight"
    if len(error) > ERROR_CHARS:
        error = error[: ERROR_CHARS // 2] + "\n…\n" + error[-ERROR_CHARS // 2 :]
    parts = [f"Your patch {what}:\n\n{error}"]
    if nearby:
        parts.append(nearby)
    edit = "complete files" if edit_format == "whole-file" else "patch"
    if switch_to:
        parts.append(
            "Answer again in a different format, against the ORIGINAL files shown above (not "
            f"on top of your previous attempt).\n\n{switch_to.rstrip()}"
        )
    else:
        parts.append(
            f"Write corrected, {edit} against the ORIGINAL files shown above (not on top of "
            "your previous attempt), in the same format."
        )
    return "\n\n".join(parts)


def extract_patch(text: str, sources: dict[str, str], edit_format: EditFormat = "diff") -> str:
    """The unified diff in a model's answer (SEARCH/REPLACE blocks and whole files are
    converted against `sources`). Raises PatchRejected, with a reason the model can act on,
    when there is none."""
    return extract_edit(text, sources, edit_format)


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
    formats: list[EditFormat] = field(default_factory=list)  # in the order asked
    stopped: str = ""  # why revising ended before `revisions` ran out


def _normal(text: str) -> str:
    return " ".join(text.split())


def _judge(
    completion: Completion,
    sources: dict[str, str],
    check: Callable[[str], Verdict],
    edit_format: EditFormat,
) -> tuple[Verdict, bool]:
    """The verdict on one answer, and whether it calls for another format."""
    if completion.stop_reason in TRUNCATED:
        return Verdict(
            False,
            "apply",
            f"your answer was cut off at the output-token limit ({completion.usage.output_tokens} "
            "tokens) before the edit was complete; write a shorter answer",
        ), True
    try:
        diff = extract_edit(completion.text, sources, edit_format)
    except AnswerRejected as exc:
        return Verdict(False, "apply", exc.reason), True
    except PatchRejected as exc:
        return Verdict(False, "apply", exc.reason), False
    return check(diff), False


def run_sample(
    client: LLMClient,
    prompt: str,
    sources: dict[str, str],
    check: Callable[[str], Verdict],
    *,
    sample: int,
    revisions: int,
    cancel: threading.Event,
    edit_format: EditFormat = "diff",
) -> SampleResult:
    out = SampleResult(sample)
    messages = [{"role": "user", "content": prompt}]
    order = list(fallback_order(edit_format))
    current = order.pop(0)
    out.formats.append(current)
    seen: dict[str, Verdict] = {}
    apply_failures = 0  # in the current format
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
        key = _normal(completion.text)
        earlier = seen.get(key)
        repeated = earlier is not None
        if earlier is not None:
            verdict = Verdict(
                False,
                earlier.stage,
                f"{earlier.error}\n(the model then repeated this answer word for word)",
                earlier.result,
            )
            switch = True
        else:
            verdict, switch = _judge(completion, sources, check, current)
            seen[key] = verdict
            out.attempts += 1
        out.verdict = verdict
        if verdict.passed:
            return out
        if revision == revisions:  # the last answer: nothing to switch to or feed back
            break
        log.info(
            "sample %d revision %d (%s): %s failed: %s",
            sample,
            revision,
            current,
            verdict.stage,
            verdict.error.splitlines()[0][:200] if verdict.error else "",
        )
        apply_failures = apply_failures + 1 if verdict.stage == "apply" else 0
        switch = switch or apply_failures >= 2
        if repeated and not order:
            out.stopped = "the model repeated an earlier answer and no other format is left"
            break
        new_format = order.pop(0) if switch and order else None
        error = verdict.error
        if earlier is not None:
            error = "Your answer repeats an earlier one word for word. " + earlier.error
        feedback = revision_prompt(
            verdict.stage or "apply",
            error,
            nearby=nearby_real_lines(completion.text, sources) if verdict.stage == "apply" else "",
            edit_format=new_format or current,
            switch_to=format_instructions(new_format, sources) if new_format else None,
        )
        if new_format:
            current, apply_failures = new_format, 0
            out.formats.append(current)
        messages += [
            {"role": "assistant", "content": completion.text},
            {"role": "user", "content": feedback},
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
    edit_format: EditFormat = "diff",
) -> tuple[SampleResult | None, list[SampleResult]]:
    """Run `samples` conversations in parallel; (the winner or None, every sample's result).
    `edit_format` is the format `prompt` asks for (build_prompt's), where revisions start."""
    cancel = threading.Event()

    def one(sample: int) -> SampleResult:
        with cancel_on(cancel):
            return run_sample(
                client,
                prompt,
                sources,
                check,
                sample=sample,
                revisions=revisions,
                cancel=cancel,
                edit_format=edit_format,
            )

    if samples <= 1:  # nothing to race: no thread of its own (one per idea cost ~1 % CPU)
        result = one(0)
        passed = result.verdict is not None and result.verdict.passed
        return (result if passed else None), [result]
    winner: SampleResult | None = None
    results: list[SampleResult] = []
    with ThreadPoolExecutor(max_workers=samples, thread_name_prefix="implementer-sample") as pool:
        for future in as_completed([pool.submit(one, i) for i in range(samples)]):
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
