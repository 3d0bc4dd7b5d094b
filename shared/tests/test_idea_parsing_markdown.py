"""Ideas that parse: the paper's format as small models render it in Markdown, JSON from
structured output, and the prompt's template rejected as an idea with the reason. Answers are
those real small models gave, replayed by a local OpenAI-compatible server."""

from __future__ import annotations

import json

import pytest
from pydantic import SecretStr

from groundloop.llm.client import LLMSettings, make_client
from groundloop.llm.idea_parsing import parse_ideas, parse_ideas_report
from groundloop.llm.idea_prompts import FORMAT, build_prompt, idea_schema
from groundloop.manifest import Metric
from tests.llm_replay_server import (
    BOLD_LABEL_IDEAS,
    IDEA_HEADERS_WITH_LABELS,
    MARKDOWN_IDEAS,
    ReplayServer,
)
from tests.llm_server import FakeLLMServer, Reply

# What Qwen2.5-Coder-1.5B answered to the earlier prompt: its format section, word for word.
OLD_TEMPLATE_ECHO = """[Experiment] One paragraph: what to change and why it should improve score (higher is better).
[Code Changes] Concrete edits to the editable files (names of functions, constants, values).
[End]"""

METRIC = Metric(name="score", direction="maximize", reward="x")


def test_markdown_headings_with_bold_code_changes():
    report = parse_ideas_report(MARKDOWN_IDEAS)
    assert report.shape == "markdown" and report.rejected == []
    assert [i.title for i in report.ideas] == [
        "Cosine learning-rate decay",
        "Wider model",
        "Warmup",
    ]
    assert report.ideas[1].code_changes == "In `config.py`, change `WIDTH = 32` to `WIDTH = 64`."
    assert "more capacity" in report.ideas[1].experiment
    assert report.ideas[0].text.startswith("[Experiment] Cosine learning-rate decay")


def test_numbered_list_with_bold_labels_colon_inside_or_outside():
    ideas = parse_ideas(BOLD_LABEL_IDEAS)
    assert [i.code_changes for i in ideas] == [
        "`MOMENTUM = 0.9` in config.py.",
        "`LEARNING_RATE = 3e-4` in config.py.",
    ]
    assert ideas[1].title.startswith("Lower the learning rate to 3e-4")


def test_idea_headings_over_labelled_parts_keep_their_titles():
    ideas = parse_ideas(IDEA_HEADERS_WITH_LABELS)
    assert [i.title for i in ideas] == ["Momentum sweep winner", "Narrow and fast"]
    assert ideas[0].experiment.startswith("Use a momentum of 0.95")
    assert ideas[1].code_changes == "In config.py set WIDTH = 16."


def test_plain_labels_and_prose_that_starts_with_experiment():
    text = (
        "Experiment: Clip gradients at norm 1.0 so rare large gradients cannot derail training.\n"
        "Code Changes: add GRAD_CLIP = 1.0 to config.py.\n\n"
        "Experiment with a bigger batch is also worth a try later."
    )
    [idea] = parse_ideas(text)
    assert idea.code_changes.startswith("add GRAD_CLIP = 1.0 to config.py.")
    assert "bigger batch" in idea.code_changes  # prose after a label stays in its part


def test_the_prompts_template_is_rejected_as_an_idea_with_the_reason():
    report = parse_ideas_report(OLD_TEMPLATE_ECHO)
    assert report.ideas == [] and len(report.rejected) == 1
    assert "repeats the prompt's format template" in report.rejected[0]
    current = FORMAT.format(metric="score", direction="higher is better")
    assert parse_ideas(current) == []  # the present format section, copied, is no idea either
    real = "[Experiment] Raise the width to 64 for more capacity within the budget.\n[Code Changes] WIDTH = 64\n[End]\n"
    mixed = parse_ideas_report(OLD_TEMPLATE_ECHO + "\n" + real)
    assert [i.code_changes for i in mixed.ideas] == ["WIDTH = 64"] and len(mixed.rejected) == 1


def test_the_prompt_has_no_fill_in_line_to_copy():
    prompt = build_prompt(
        environment="# Environment: synthetic",
        metric=METRIC,
        mode="fresh",
        count=3,
        context=[],
        baseline_score=None,
        written_this_generation=[],
    )
    assert "[Experiment] One paragraph" not in prompt and "[Experiment]" in prompt
    for line in prompt.splitlines():  # no line is an idea waiting to be copied
        assert not line.startswith(("[Experiment] ", "[Code Changes] "))
    structured = build_prompt(
        environment="# Environment: synthetic",
        metric=METRIC,
        mode="fresh",
        count=3,
        context=[],
        baseline_score=None,
        written_this_generation=[],
        structured=True,
    )
    assert '{"ideas": [...]}' in structured and "3 ideas" in structured


def test_the_schema_is_strict_mode_valid():
    schema = idea_schema(3).schema
    item = schema["properties"]["ideas"]["items"]
    assert schema["additionalProperties"] is False and schema["required"] == ["ideas"]
    assert item["additionalProperties"] is False
    assert (
        sorted(item["required"])
        == sorted(item["properties"])
        == [
            "code_changes",
            "experiment",
            "title",
        ]
    )


IDEAS_JSON = {
    "ideas": [
        {
            "title": "Cosine schedule",
            "experiment": "Decay the learning rate with a cosine schedule to settle late.",
            "code_changes": "SCHEDULE = 'cosine' in config.py",
        }
    ]
}


@pytest.mark.parametrize(
    "answer",
    [MARKDOWN_IDEAS, BOLD_LABEL_IDEAS, IDEA_HEADERS_WITH_LABELS, json.dumps(IDEAS_JSON)],
)
def test_replayed_answers_parse_through_a_real_client(answer):
    with ReplayServer() as server:
        server.responder = lambda request: Reply(text=answer)
        client = make_client(f"openai-compatible:small@{server.openai_base_url}", LLMSettings())
        completion = client.complete(
            [{"role": "user", "content": "ideas"}], response_format=idea_schema()
        )
        sent = server.requests[0].body["response_format"]
    assert sent["json_schema"]["name"] == "ideas"
    assert len(parse_ideas(completion.text)) >= 1


def test_anthropic_gets_the_schema_as_a_forced_tool():
    with FakeLLMServer() as server:
        server.responder = lambda request: Reply(text=json.dumps(IDEAS_JSON))
        settings = LLMSettings(
            anthropic_api_key=SecretStr("k"), anthropic_base_url=server.anthropic_base_url
        )
        client = make_client("anthropic:claude-sonnet-4-5", settings)
        completion = client.complete(
            [{"role": "user", "content": "ideas"}], response_format=idea_schema()
        )
        body = server.requests[0].body
    assert body["tool_choice"] == {"type": "tool", "name": "ideas"}
    assert body["tools"][0]["input_schema"] == idea_schema().schema
    assert [i.title for i in parse_ideas(completion.text)] == ["Cosine schedule"]
