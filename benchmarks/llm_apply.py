"""Language-model benchmark: ideas that parse and patches that apply, per edit format.

    .venv/bin/python benchmarks/llm_apply.py --model openai-compatible:NAME@URL
        [--env synthetic] [--ideas 2] [--formats diff,search-replace,whole-file]
        [--revisions 0] [--timeout-s 600] [--max-output-tokens 8192] [--plain-ideas]
        [--answers-dir DIR]

Asks the model for `--ideas` fresh ideas for the environment through the ideator's real prompt
and parser (prompts.build_prompt, parsing.parse_ideas_report; JSON structured output as the
service asks for it unless --plain-ideas), calling again for missing ideas up to twice more.
Then, for every idea and every edit format, asks for a patch through the implementer's real
prompt and conversation (llm_patch.build_prompt / implement, one sample, `--revisions`
revisions; 0 measures each format on its own, since revisions may fall back to another format)
and checks it as the implementer does (candidates.check_candidate: strict apply, then the
pre-flight smoke run in the sandbox). Prints two tables: ideas parsed per call, and per edit
format the patches applied, pre-flight passed, tokens (prompt/completion) and seconds.
Everything goes through the real LLM client (groundloop.llm.client), so a local server
(llama.cpp, vLLM, Ollama) or tests/llm_replay_server.py both work.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from groundloop.events import Usage
from groundloop.execution.environment import Environment
from groundloop.implementer.candidates import (
    ImplementerDeps,
    check_candidate,
    environment_sources,
)
from groundloop.implementer.llm_patch import EDIT_FORMATS, EditFormat, implement
from groundloop.implementer.llm_patch import build_prompt as patch_prompt
from groundloop.llm.client import (
    Completion,
    LLMClient,
    LLMError,
    LLMSettings,
    Message,
    make_client,
)
from groundloop.llm.idea_parsing import ParsedIdea, parse_ideas_report
from groundloop.llm.idea_prompts import SYSTEM as IDEATOR_SYSTEM
from groundloop.llm.idea_prompts import build_prompt as idea_prompt
from groundloop.llm.idea_prompts import idea_schema
from groundloop.llm.pricing import add_usage

EXTRA_IDEA_CALLS = 2  # as the ideator's default IdeatorDeps.extra_calls


class Recording:
    """The real client, each answer also written to `folder` (to see why a patch failed)."""

    def __init__(self, client: LLMClient, folder: Path):
        self.spec, self._client, self._folder, self._count = client.spec, client, folder, 0
        folder.mkdir(parents=True, exist_ok=True)

    def complete(self, messages: Sequence[Message], **kw: Any) -> Completion:
        completion = self._client.complete(messages, **kw)
        self._count += 1
        name = f"{self._count:03d}-{completion.stop_reason}.txt"
        (self._folder / name).write_text(f"{messages[-1]['content']}\n\n=====\n{completion.text}")
        return completion


@dataclass
class IdeaRound:
    ideas: list[ParsedIdea] = field(default_factory=list)
    per_call: list[int] = field(default_factory=list)  # ideas parsed by each call
    rejected: int = 0
    shapes: list[str] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    seconds: float = 0.0
    error: str = ""


@dataclass
class FormatRow:
    edit_format: EditFormat
    patches: int = 0  # ideas asked for a patch
    applied: int = 0  # the last answer applied strictly (whether or not pre-flight passed)
    passed: int = 0  # ... and passed pre-flight
    model_errors: int = 0
    calls: int = 0
    usage: Usage = field(default_factory=Usage)
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)  # one line per failed patch


def ask_ideas(client: LLMClient, env: Environment, count: int, structured: bool) -> IdeaRound:
    """`count` fresh ideas, as llm_proposer asks for them (bounded calls for missing ones)."""
    out = IdeaRound()
    begin = time.perf_counter()
    for _ in range(1 + EXTRA_IDEA_CALLS):
        wanted = count - len(out.ideas)
        if wanted <= 0:
            break
        prompt = idea_prompt(
            environment=env.describe_for_prompt(),
            metric=env.manifest.metric,
            mode="fresh",
            count=wanted,
            context=[],
            baseline_score=None,
            written_this_generation=[i.title for i in out.ideas],
            structured=structured,
        )
        try:
            completion = client.complete(
                [{"role": "user", "content": prompt}],
                system=IDEATOR_SYSTEM,
                response_format=idea_schema(wanted) if structured else None,
            )
        except LLMError as exc:
            out.error = str(exc)
            break
        out.usage = add_usage(out.usage, completion.usage)
        report = parse_ideas_report(completion.text)
        out.per_call.append(len(report.ideas))
        out.rejected += len(report.rejected)
        out.shapes.append(report.shape)
        out.ideas += report.ideas[:wanted]
    out.seconds = time.perf_counter() - begin
    return out


def patch_row(
    client: LLMClient,
    env: Environment,
    ideas: list[ParsedIdea],
    edit_format: EditFormat,
    deps: ImplementerDeps,
    revisions: int,
) -> FormatRow:
    row = FormatRow(edit_format)
    sources = environment_sources(env)
    seed = env.manifest.seeds[0] if env.manifest.seeds else 0
    begin = time.perf_counter()
    for idea in ideas:
        row.patches += 1
        _winner, [result] = implement(
            client,
            patch_prompt(env, idea.title, idea.text, edit_format),
            env.editable_sources(),
            lambda diff: check_candidate(env, diff, sources, deps, seed),
            samples=1,
            revisions=revisions,
            edit_format=edit_format,
        )
        row.calls += result.calls
        row.usage = add_usage(row.usage, result.usage)
        verdict = result.verdict
        if verdict is not None and verdict.stage != "apply":
            row.applied += 1
        if verdict is not None and verdict.passed:
            row.passed += 1
            continue
        if result.model_error is not None and verdict is None:
            row.model_errors += 1
            why = f"model: {result.model_error}"
        else:
            assert verdict is not None
            why = f"{verdict.stage}: {verdict.error}"
        row.failures.append(f"{idea.title[:40]!r} ({'>'.join(result.formats)}): {why}")
    row.seconds = time.perf_counter() - begin
    return row


def idea_table(model: str, env: str, wanted: int, r: IdeaRound) -> list[str]:
    per_call = ",".join(map(str, r.per_call)) or "-"
    lines = [
        f"ideas: {model} on {env}, {wanted} wanted",
        "| calls | ideas parsed per call | ideas kept | rejected | shapes | prompt tok | completion tok | seconds |",
        "|---|---|---|---|---|---|---|---|",
        f"| {len(r.per_call)} | {per_call} | {len(r.ideas)} | {r.rejected} | "
        f"{','.join(r.shapes) or '-'} | {r.usage.input_tokens} | {r.usage.output_tokens} | "
        f"{r.seconds:.1f} |",
    ]
    if r.error:
        lines.append(f"model error: {r.error}")
    return lines


def format_table(rows: Sequence[FormatRow], revisions: int) -> list[str]:
    lines = [
        f"patches: one sample, {revisions} revision(s) per idea",
        "| edit format | ideas | applied | pre-flight passed | model errors | calls | prompt tok "
        "| completion tok | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.edit_format} | {row.patches} | {row.applied} | {row.passed} | "
            f"{row.model_errors} | {row.calls} | {row.usage.input_tokens} | "
            f"{row.usage.output_tokens} | {row.seconds:.1f} |"
        )
    return lines


def parse_formats(text: str) -> list[EditFormat]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in EDIT_FORMATS]
    if unknown:
        raise SystemExit(
            f"unknown edit format(s) {', '.join(unknown)}; choose from {', '.join(EDIT_FORMATS)}"
        )
    return names  # type: ignore[return-value]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--model", required=True, help="e.g. openai-compatible:NAME@URL")
    parser.add_argument("--env", default="synthetic")
    parser.add_argument("--ideas", type=int, default=2)
    parser.add_argument("--formats", default=",".join(EDIT_FORMATS))
    parser.add_argument("--revisions", type=int, default=0)
    parser.add_argument("--timeout-s", type=float, default=600.0, help="per model request")
    parser.add_argument("--max-output-tokens", type=int, default=8192)
    parser.add_argument(
        "--plain-ideas", action="store_true", help="ask for ideas as text, not JSON"
    )
    parser.add_argument("--answers-dir", type=Path, help="write every prompt and answer here")
    args = parser.parse_args(argv)
    formats = parse_formats(args.formats)
    env = Environment.load(args.env)
    settings = LLMSettings(timeout_s=args.timeout_s, max_output_tokens=args.max_output_tokens)
    client: LLMClient = make_client(args.model, settings)
    if args.answers_dir is not None:
        client = Recording(client, args.answers_dir)
    print(f"model {client.spec.label}, environment {env.name}", flush=True)
    ideas = ask_ideas(client, env, args.ideas, structured=not args.plain_ideas)
    for idea in ideas.ideas:
        print(f"  idea: {idea.title}", file=sys.stderr)
    rows: list[FormatRow] = []
    with tempfile.TemporaryDirectory(prefix="llm-apply-") as tmp:
        deps = ImplementerDeps(
            search=lambda _s: None,
            environment=lambda _n: env,
            llm=lambda _m, _p: client,
            work_dir=Path(tmp) / "work",
            cache_dir=Path(tmp) / "cache",
        )
        for edit_format in formats:
            row = patch_row(client, env, ideas.ideas, edit_format, deps, args.revisions)
            for line in row.failures:
                print(f"  {edit_format} failed: {line.splitlines()[0][:300]}", file=sys.stderr)
            rows.append(row)
            print(f"  {edit_format}: {row.passed}/{row.patches} passed", file=sys.stderr)
    print("\n".join(idea_table(client.spec.label, env.name, args.ideas, ideas)))
    print()
    print("\n".join(format_table(rows, args.revisions)))
    return 0 if ideas.ideas else 1


if __name__ == "__main__":
    sys.exit(main())
