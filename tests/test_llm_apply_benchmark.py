"""benchmarks/llm_apply.py against the local OpenAI-compatible replay server: one idea, one
patch per edit format (one that passes, one that does not apply, one that applies but fails
pre-flight), and the printed tables carry the counts and the tokens the server reported."""

from __future__ import annotations

import json
import re

from benchmarks import llm_apply
from groundloop.execution.applier import make_diff
from groundloop.execution.environment import Environment
from tests.llm_replay_server import ReplayServer
from tests.llm_server import Reply

MODEL = "bench-model"


def table_row(out: str, first_cell: str) -> list[str]:
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row starting {first_cell!r} in:\n{out}")


def test_benchmark_prints_ideas_and_one_row_per_format(capsys, tmp_path):
    config = Environment.load("synthetic").editable_sources()["config.py"]
    idea = {
        "title": "Cosine schedule",
        "experiment": "Decay the learning rate along a cosine so late steps settle the model.",
        "code_changes": 'In config.py set SCHEDULE = "cosine".',
    }
    cosine = config.replace('SCHEDULE = "constant"', 'SCHEDULE = "cosine"')
    diff = make_diff({"config.py": config}, {"config.py": cosine})
    broken = config.replace("WIDTH = 32", "WIDTH = (32")  # applies, fails to compile
    with ReplayServer(models=[MODEL]) as server:
        server.enqueue(
            Reply(text=json.dumps({"ideas": [idea]}), input_tokens=900, output_tokens=120),
            Reply(text=f"```diff\n{diff}```\n", input_tokens=1000, output_tokens=80),
            Reply(
                text="config.py\n<<<<<<< SEARCH\nWIDTH = 33\n=======\nWIDTH = 64\n>>>>>>> REPLACE\n",
                input_tokens=1100,
                output_tokens=60,
            ),
            Reply(
                text=f"config.py\n```python\n{broken}```\n", input_tokens=1200, output_tokens=400
            ),
        )
        code = llm_apply.main(
            [
                "--model",
                f"openai-compatible:{MODEL}@{server.openai_base_url}",
                "--env",
                "synthetic",
                "--ideas",
                "1",
                "--timeout-s",
                "30",
                "--answers-dir",
                str(tmp_path / "answers"),
            ]
        )
        asked = [r.body for r in server.requests]
    out = capsys.readouterr().out
    answers = sorted(p.name for p in (tmp_path / "answers").iterdir())
    assert answers == ["001-stop.txt", "002-stop.txt", "003-stop.txt", "004-stop.txt"]
    assert code == 0
    assert len(asked) == 4  # one ideas call, then one patch call per format (no revisions)
    assert asked[0].get("response_format", {}).get("type") == "json_schema"
    # calls | ideas parsed per call | kept | rejected | shapes | prompt tok | completion tok
    assert table_row(out, "1")[:7] == ["1", "1", "1", "0", "json", "900", "120"]
    # ideas | applied | pre-flight passed | model errors | calls | prompt tok | completion tok
    assert table_row(out, "diff")[1:8] == ["1", "1", "1", "0", "1", "1000", "80"]
    assert table_row(out, "search-replace")[1:8] == ["1", "0", "0", "0", "1", "1100", "60"]
    assert table_row(out, "whole-file")[1:8] == ["1", "1", "0", "0", "1", "1200", "400"]
    for fmt in ("diff", "search-replace", "whole-file"):
        assert re.fullmatch(r"\d+\.\d", table_row(out, fmt)[8])  # seconds, not compared


def test_benchmark_reports_an_unknown_format():
    try:
        llm_apply.parse_formats("diff,patchy")
    except SystemExit as exc:
        assert "patchy" in str(exc) and "whole-file" in str(exc)
    else:
        raise AssertionError("an unknown edit format was accepted")
