"""Edit formats by model strength: whole files for small local models, diffs for frontier
ones; prompt examples made of real lines; echoes of the example or the old template rejected
saying so; whole-file answers in the shapes small models write them; revisions that change
format, stop on repeats and show the real lines. Conversations go through a real HTTP model
server and the real applier + pre-flight (`check_candidate`)."""

from __future__ import annotations

import threading

import pytest

from groundloop.execution.applier import PatchRejected, make_diff
from groundloop.execution.environment import Environment
from groundloop.implementer.edit_formats import (
    EXAMPLE_MARK,
    default_edit_format,
    extract_edit,
    format_instructions,
    nearby_real_lines,
)
from groundloop.implementer.llm_patch import build_prompt, run_sample
from groundloop.implementer.service import ImplementerDeps, check_candidate
from groundloop.llm.client import LLMSettings, make_client
from tests.llm_replay_server import ReplayServer
from tests.llm_server import Reply

OLD_TEMPLATE_ECHO = """```diff
--- a/config.py
+++ b/config.py
@@ -10,7 +10,7 @@
 unchanged context line
-old line
+new line
 unchanged context line
```"""


@pytest.fixture
def synthetic() -> Environment:
    return Environment.load("synthetic")


@pytest.fixture
def sources(synthetic) -> dict[str, str]:
    return synthetic.editable_sources()


def changed(sources: dict[str, str], old: str, new: str) -> str:
    text = sources["config.py"]
    assert old in text
    return text.replace(old, new, 1)


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("openai-compatible:qwen2.5-coder-1.5b-instruct@http://127.0.0.1:8080/v1", "whole-file"),
        ("openai-compatible:anything@http://localhost:11434/v1", "whole-file"),
        ("openai-compatible:qwen2.5-coder-7b-instruct@http://gpu-box:8000/v1", "whole-file"),
        ("openai-compatible:llama-3.1-70b-instruct@http://gpu-box:8000/v1", "diff"),
        ("openai-compatible:mixtral-8x7b@http://gpu-box:8000/v1", "diff"),
        ("anthropic:claude-sonnet-4-5", "diff"),
        ("openai:gpt-5", "diff"),
        ("not a spec", "diff"),
    ],
)
def test_default_edit_format_by_model(model, expected):
    assert default_edit_format(model) == expected


@pytest.mark.parametrize("edit_format", ["diff", "search-replace", "whole-file"])
def test_prompt_examples_are_real_lines_never_placeholders(synthetic, edit_format):
    prompt = build_prompt(synthetic, "t", "idea", edit_format)
    section = prompt.split("## Answer format", 1)[1]
    for placeholder in ("unchanged context line", "-old line", "@@ -10,7 +10,7 @@", "lines copied"):
        assert placeholder not in section
    if edit_format == "whole-file":
        assert "`SLEEP_SECONDS = 0.0`" in section and "all 13 lines of config.py" in section
    else:
        assert (
            f"LEARNING_RATE = 1e-3  # step size (log scale, 1e-4 .. 1e-1)  {EXAMPLE_MARK}"
            in section
        )
    if edit_format == "diff":  # a real, correct hunk header of config.py
        assert "@@ -3,7 +3,7 @@" in section and " MOMENTUM = 0.5  # 0 .. 0.99" in section


def test_an_echo_of_the_old_template_is_rejected_saying_so(sources):
    with pytest.raises(PatchRejected, match="copies the format template from the prompt"):
        extract_edit(OLD_TEMPLATE_ECHO, sources, "diff")


@pytest.mark.parametrize("edit_format", ["diff", "search-replace"])
def test_an_echo_of_the_prompts_example_is_rejected_saying_so(sources, edit_format):
    section = format_instructions(edit_format, sources)
    example = section.split("For example:\n\n", 1)[1].split("\n\nThe example only", 1)[0]
    with pytest.raises(PatchRejected, match="repeats the example from the prompt's format"):
        extract_edit(f"Here is my patch:\n{example}\n", sources, edit_format)


def whole_file_shapes(new: str) -> list[str]:
    body = new.rstrip("\n")
    return [
        f"config.py\n```python\n{body}\n```",
        f"Here is the updated file.\n\n### config.py\n```python\n{body}\n```\nDone.",
        f"**config.py**\n```\n{body}\n```",
        f"File: config.py\n\n```python\n{body}\n```",
        f"```python config.py\n{body}\n```",
        f"```python\n{body}\n```",  # one editable file: the block is that file
        f"config.py\n{body}\n",  # no fences at all
    ]


def test_whole_file_answers_with_and_without_fences(sources):
    new = changed(sources, "WIDTH = 32", "WIDTH = 128")
    expected = make_diff(sources, {"config.py": new})
    for answer in whole_file_shapes(new):
        assert extract_edit(answer, sources, "whole-file") == expected, answer
        assert extract_edit(answer, sources, "diff") == expected, answer  # asked for a diff


def test_incomplete_or_unchanged_whole_files_are_rejected(sources):
    text = sources["config.py"]
    elided = text.split("WIDTH")[0] + "WIDTH = 128\n# ... rest of the file unchanged\n"
    with pytest.raises(PatchRejected, match="incomplete .*write every line"):
        extract_edit(f"config.py\n```python\n{elided}```", sources, "whole-file")
    with pytest.raises(PatchRejected, match="identical to the originals"):
        extract_edit(f"config.py\n```python\n{text}```", sources, "whole-file")
    with pytest.raises(PatchRejected, match="no complete file found"):
        extract_edit("I would raise the width.", sources, "whole-file")


def test_the_error_shows_the_real_lines_near_a_wrong_one(sources):
    answer = (
        "config.py\n<<<<<<< SEARCH\nMOMENTUM = 0.9\n=======\nMOMENTUM = 0.95\n>>>>>>> REPLACE\n"
    )
    nearby = nearby_real_lines(answer, sources)
    assert "'MOMENTUM = 0.9' is not in config.py" in nearby
    assert "    7 | MOMENTUM = 0.5  # 0 .. 0.99" in nearby and "LEARNING_RATE = 1e-3" in nearby


# ---------------------------------------------------------------------------- conversations


@pytest.fixture
def conversation(tmp_path, synthetic, sources):
    """run_sample against a local model server; the check is the service's apply + pre-flight."""
    deps = ImplementerDeps(
        search=lambda _: None,
        environment=lambda _: synthetic,
        llm=lambda *_: None,  # type: ignore[arg-type, return-value]
        work_dir=tmp_path / "work",
        cache_dir=tmp_path / "cache",
    )
    all_sources = {rel: (synthetic.root / rel).read_text() for rel in synthetic.files()}
    with ReplayServer() as server:
        client = make_client(
            f"openai-compatible:small@{server.openai_base_url}", LLMSettings(timeout_s=30)
        )

        def run(edit_format: str, revisions: int):
            return run_sample(
                client,
                build_prompt(synthetic, "wider", "Raise WIDTH to 128.", edit_format),  # type: ignore[arg-type]
                sources,
                lambda diff: check_candidate(synthetic, diff, all_sources, deps, 0),
                sample=0,
                revisions=revisions,
                cancel=threading.Event(),
                edit_format=edit_format,  # type: ignore[arg-type]
            )

        yield server, run


def test_a_template_echo_moves_to_the_next_format_and_a_whole_file_passes(conversation, sources):
    server, run = conversation
    good = changed(sources, "WIDTH = 32", "WIDTH = 128")
    server.enqueue(
        Reply(text=OLD_TEMPLATE_ECHO),
        Reply(text="config.py\n<<<<<<< SEARCH\nWIDTH = 64\n=======\nWIDTH = 128\n>>>>>>> REPLACE"),
        Reply(text="config.py\n<<<<<<< SEARCH\nWIDTH = 16\n=======\nWIDTH = 128\n>>>>>>> REPLACE"),
        Reply(text=f"config.py\n```python\n{good}```"),
    )
    result = run("diff", 3)
    assert result.verdict is not None and result.verdict.passed, result.verdict
    assert result.formats == ["diff", "search-replace", "whole-file"]
    second, third, fourth = (r.last_user_text for r in server.requests[1:])
    assert "copies the format template" in second and "<<<<<<< SEARCH" in second
    assert "WIDTH = 32  # model width" in third  # the real line near the wrong one
    assert "all 13 lines of config.py" in fourth  # two apply failures: now whole files


def test_a_repeated_answer_ends_the_revisions(conversation):
    server, run = conversation
    server.responder = lambda request: Reply(text=OLD_TEMPLATE_ECHO)
    result = run("whole-file", 6)
    # whole-file -> search-replace -> diff, each answered with the same echo: then it stops
    assert len(server.requests) == 3 and result.attempts == 1
    assert "repeated an earlier answer" in result.stopped
    assert "repeated this answer word for word" in result.verdict.error  # type: ignore[union-attr]
    assert "repeats an earlier one word for word" in server.requests[2].last_user_text


def test_a_truncated_answer_is_reported_as_cut_off(conversation, sources):
    server, run = conversation
    good = changed(sources, "WIDTH = 32", "WIDTH = 128")
    half = good[: len(good) // 2]
    server.enqueue(
        Reply(text=f"config.py\n```python\n{half}", finish_reason="length", output_tokens=512),
        Reply(text=f"config.py\n```python\n{good}```"),
    )
    result = run("whole-file", 1)
    assert result.verdict is not None and result.verdict.passed
    assert "cut off at the output-token limit (512 tokens)" in server.requests[1].last_user_text


# Shapes a real 1.5B model wrote (benchmarks/llm_apply.py against Qwen2.5-Coder-1.5B).


def test_a_real_change_that_kept_the_examples_comment_is_accepted_without_it(sources):
    """The model copied `# example edit` onto its own change: the change counts, the marker
    is dropped; only the example's own change (the comment alone) is an echo."""
    answer = (
        "config.py\n<<<<<<< SEARCH\nWIDTH = 32  # model width (8 .. 512)\n=======\n"
        f"WIDTH = 128  # model width (8 .. 512)  {EXAMPLE_MARK}\n>>>>>>> REPLACE"
    )
    diff = extract_edit(answer, sources, "search-replace")
    assert EXAMPLE_MARK not in diff
    assert diff == make_diff(sources, {"config.py": changed(sources, "WIDTH = 32", "WIDTH = 128")})
    only_marker = (
        "config.py\n<<<<<<< SEARCH\nWIDTH = 32  # model width (8 .. 512)\n=======\n"
        f"WIDTH = 32  # model width (8 .. 512)  {EXAMPLE_MARK}\n>>>>>>> REPLACE"
    )
    with pytest.raises(PatchRejected, match="repeats the example"):
        extract_edit(only_marker, sources, "search-replace")


def test_a_file_fenced_inside_a_repeated_description_is_the_file(sources, synthetic):
    """The model repeated the prompt's description inside a ```python block, then the file
    under its own header and fence: the file is what follows the inner fence."""
    new = changed(sources, "WIDTH = 32", "WIDTH = 128").rstrip("\n")
    answer = (
        "```python\n"
        f"{synthetic.manifest.description.strip()[:300]}\n\n"
        f"## config.py (editable)\n```python\n{new}\n```\n"
    )
    assert extract_edit(answer, sources, "whole-file") == make_diff(
        sources, {"config.py": new + "\n"}
    )


def test_the_last_answer_asks_for_no_further_format(conversation, sources):
    server, run = conversation
    server.enqueue(Reply(text=OLD_TEMPLATE_ECHO))
    result = run("diff", 0)
    assert len(server.requests) == 1 and result.formats == ["diff"]  # never asked for another
