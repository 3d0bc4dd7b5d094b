"""A patch that edits two files of a multi-file environment, end to end.

tinygrpo's training spans three editable files (train.py, sampler.py, loss.py). Here a local
OpenAI-compatible model server answers the implementer's prompt with two whole files (top-k
sampling in sampler.py, clipped advantages in loss.py); the implementer turns that into one
two-file diff and checks it as a runner would meet it (strict applier, pre-flight with the
real smoke run in the sandbox); the runner's protocol then runs it to a scored result. A patch
that also touches a protected file is rejected as a whole: nothing of it is applied.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from groundloop.execution.applier import PatchRejected, make_diff
from groundloop.execution.environment import Environment
from groundloop.execution.run_protocol import execute
from groundloop.implementer.candidates import (
    Candidate,
    ImplementerDeps,
    check_candidate,
    environment_sources,
)
from groundloop.implementer.llm_patch import build_prompt, run_sample
from groundloop.llm.client import LLMSettings, make_client
from tests.llm_replay_server import ReplayServer
from tests.llm_server import Reply
from tests.paths import ENVIRONMENTS

pytestmark = pytest.mark.slow

ENV = Environment.load("tinygrpo", ENVIRONMENTS)
SOURCES = ENV.editable_sources()
IDEA = (
    "Top-k rollouts with bounded advantages",
    "Sample rollouts from the 4 most likely tokens only (sampler.py), and clip the "
    "group-normalised advantages to [-3, 3] (loss.py) so one lucky group cannot dominate.",
)


def edited(path: str, old: str, new: str) -> str:
    text = SOURCES[path]
    assert text.count(old) == 1, f"the baseline {path} changed; update this test"
    return text.replace(old, new)


SAMPLER = edited(
    "sampler.py",
    '        logits[:, task.PAD_ID] = float("-inf")\n',
    '        logits[:, task.PAD_ID] = float("-inf")\n'
    "        kth = logits.topk(TOP_K, dim=-1).values[:, -1:]\n"
    '        logits = logits.masked_fill(logits < kth, float("-inf"))\n',
).replace("TEMPERATURE = 1.0\n", 'TEMPERATURE = 1.0\nTOP_K = 4\nprint(f"sampler: top-k {TOP_K}")\n')
LOSS = edited(
    "loss.py",
    "def advantages(rewards: torch.Tensor) -> torch.Tensor:\n",
    "def advantages(rewards: torch.Tensor) -> torch.Tensor:\n"
    "    return _advantages(rewards).clamp(-ADV_CLIP, ADV_CLIP)\n\n\n"
    "def _advantages(rewards: torch.Tensor) -> torch.Tensor:\n",
).replace(
    "CLIP_EPS = 0.2\n",
    'CLIP_EPS = 0.2\nADV_CLIP = 3.0\nprint(f"loss: advantages clipped at {ADV_CLIP}")\n',
)
# How a small local model writes whole files: a line with the path, then a fenced block.
WHOLE_FILE_ANSWER = (
    "Here are the changed files.\n\n"
    f"sampler.py\n```python\n{SAMPLER}```\n\n"
    f"loss.py\n```python\n{LOSS}```\n"
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One cache root for pre-flight and the run, so the base policy is built once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def implemented(tmp_path_factory, cache):
    """The implementer's conversation with a local model server that answers in whole files;
    every candidate is checked by the implementer's own apply + pre-flight."""
    work = tmp_path_factory.mktemp("implementer")
    deps = ImplementerDeps(
        search=lambda _: None,
        environment=lambda _: ENV,
        llm=lambda *_: None,  # type: ignore[arg-type, return-value]
        work_dir=work,
        cache_dir=cache,
    )
    with ReplayServer() as server:
        server.enqueue(Reply(text=WHOLE_FILE_ANSWER, output_tokens=2500))
        client = make_client(
            f"openai-compatible:small@{server.openai_base_url}", LLMSettings(timeout_s=30)
        )
        result = run_sample(
            client,
            build_prompt(ENV, *IDEA, "whole-file"),
            SOURCES,
            lambda diff: check_candidate(ENV, diff, environment_sources(ENV), deps, 0),
            sample=0,
            revisions=0,
            cancel=threading.Event(),
            edit_format="whole-file",
        )
        return result, server.requests


def test_the_prompt_shows_every_editable_file_in_full():
    assert ENV.manifest.editable == ["train.py", "loss.py", "sampler.py"]
    for edit_format in ("diff", "search-replace", "whole-file"):
        prompt = build_prompt(ENV, *IDEA, edit_format)  # type: ignore[arg-type]
        for rel, text in SOURCES.items():
            assert f"## {rel} (editable)\n```python\n{text.rstrip()}\n```" in prompt, rel
        assert "Edit only these files: train.py, loss.py, sampler.py." in prompt
        assert "task.py: protected" in prompt and "def reward" not in prompt  # hidden


def test_a_two_file_whole_file_answer_becomes_one_diff_that_passes_preflight(implemented):
    result, requests = implemented
    assert len(requests) == 1 and "## sampler.py (editable)" in requests[0].all_text
    verdict = result.verdict
    assert verdict is not None and verdict.passed, verdict
    candidate = verdict.result
    assert isinstance(candidate, Candidate)
    assert candidate.diff == make_diff(SOURCES, {**SOURCES, "loss.py": LOSS, "sampler.py": SAMPLER})
    assert candidate.diff.count("diff --git") == 2
    assert candidate.made.files_changed == ["loss.py", "sampler.py"]
    checks = {c.name: c for c in candidate.report.checks}
    assert [c.name for c in candidate.report.checks] == ["compile", "protected", "smoke"]
    assert all(c.ok for c in checks.values()), checks


def test_the_two_file_patch_runs_through_the_protocol_to_a_score(implemented, cache, tmp_path):
    diff = implemented[0].verdict.result.diff
    made = ENV.materialize(tmp_path / "ws", diff)  # the strict applier, as a runner does
    assert made.files_changed == ["loss.py", "sampler.py"]
    assert (made.path / "loss.py").read_text() == LOSS
    assert (made.path / "sampler.py").read_text() == SAMPLER
    result = execute(
        ENV, made.path, seed=0, run_dir=tmp_path / "run", cache_dir=cache / ENV.name, smoke=True
    )
    outcome = result.outcome
    assert outcome.status == "succeeded", outcome.reason
    assert 0.0 <= outcome.score <= 1.0 and outcome.metrics["problems"] == 64
    # Both edited files ran in the training process.
    assert "sampler: top-k 4" in result.train.output_tail
    assert "loss: advantages clipped at 3.0" in result.train.output_tail


def test_a_patch_that_also_touches_a_protected_file_is_rejected_as_a_whole(tmp_path, cache):
    task = (ENV.root / "task.py").read_text()
    old = "return 1.0 if completion_text"
    assert old in task, "task.py changed; update this test"
    diff = make_diff(
        {**SOURCES, "task.py": task},
        {
            **SOURCES,
            "loss.py": LOSS,
            "sampler.py": SAMPLER,
            "task.py": task.replace(old, old.replace("if", "if True or")),
        },
    )
    assert diff.count("diff --git") == 3
    with pytest.raises(PatchRejected, match="task.py is protected"):
        ENV.materialize(tmp_path / "ws", diff)
    for rel in ("loss.py", "sampler.py", "task.py"):  # nothing of the patch was applied
        assert (tmp_path / "ws" / rel).read_text() == (ENV.root / rel).read_text(), rel
    deps = ImplementerDeps(
        search=lambda _: None,
        environment=lambda _: ENV,
        llm=lambda *_: None,  # type: ignore[arg-type, return-value]
        work_dir=tmp_path / "work",
        cache_dir=cache,
    )
    verdict = check_candidate(ENV, diff, environment_sources(ENV), deps, 0)
    assert not verdict.passed and verdict.stage == "apply" and "task.py" in verdict.error
    assert verdict.result is None  # rejected before any workspace or smoke run
