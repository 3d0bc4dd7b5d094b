"""`groundloop analyze`: numbers checked by hand on small logs, patch classes on the synthetic
environment's real files, similarity measures, the LLM judge against a local model server,
and the command itself on a real broker with two searches side by side."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from groundloop import events as ev
from groundloop.analysis.analyze import analyze_events
from groundloop.analysis.diversity import (
    DiversityError,
    TfidfSimilarity,
    choose_measure,
    distinct_fraction,
    mean_pairwise,
    wordllama_measure,
)
from groundloop.analysis.idea_classes import classify_idea
from groundloop.analysis.idea_judge import IdeaJudge, parse_verdict
from groundloop.bus import Bus
from groundloop.cli.history import publish_all
from groundloop.execution.diffs import make_diff
from groundloop.llm.client import make_client
from groundloop.settings import Settings
from tests.factories import (
    idea_proposed,
    patch_ready,
    run_completed,
    run_of_idea,
    run_result,
    search_started,
)
from tests.history_support import SYNTHETIC, record_source
from tests.llm_server import FakeLLMServer, Reply, Request, fast_settings

CLI = [sys.executable, "-m", "groundloop.cli.main"]
CONFIG = SYNTHETIC.editable_sources()
KNOBS = [k.name for k in SYNTHETIC.manifest.knobs]


def config_diff(new_text: str) -> str:
    return make_diff(CONFIG, {"config.py": new_text})


def small_search() -> list[ev.Event]:
    """Generation 0: two valid ideas (scores 1 and 3), a failed patch, a failed run;
    generation 1: one valid idea (score 2) and one still waiting for its patch. Plus baseline
    runs and a final re-evaluation run, which are not ideas' results."""
    events: list[ev.Event] = [search_started("hand")]
    baseline = idea_proposed("hand", 99, mode="baseline", title="baseline", text="unmodified")
    events += [
        baseline,
        run_result("hand", "b0", purpose="baseline", score=0.5),
        run_result("hand", "b1", purpose="baseline", score=0.7),
    ]
    ideas = [
        idea_proposed("hand", n, generation=g, title=f"idea {g}.{n}", text=f"tune knob {n} of {g}")
        for g, n in [(0, 0), (0, 1), (0, 2), (0, 3), (1, 4), (1, 5)]
    ]
    events += ideas
    for i, score in [(0, 1.0), (1, 3.0), (4, 2.0)]:
        patch = patch_ready(ideas[i])
        events += [patch, run_completed(patch, score)]
    events.append(
        ideas[2].derive(
            ev.PatchFailed,
            "implementer",
            idea_id=ideas[2].idea_id,
            generation=0,
            attempts=2,
            stage="apply",
            last_error="hunk 1 does not match",
        )
    )
    events += [patch_ready(ideas[3]), run_of_idea(ideas[3], "failed", None)]
    events.append(run_of_idea(ideas[0], "succeeded", 9.0, purpose="reeval"))  # not counted
    return events


def test_execution_rate_failures_and_scores_per_generation_by_hand() -> None:
    a = analyze_events(small_search())
    g0, g1 = a["generations"]
    assert (g0["ideas"], g0["valid"], g0["pending"], g0["patched"]) == (4, 2, 0, 3)
    assert g0["execution_rate"] == 0.5
    assert g0["failures"] == {"patch failed (apply)": 1, "run failed": 1}
    assert (g0["best_score"], g0["mean_score"], g0["best_so_far_score"]) == (3.0, 2.0, 3.0)
    # the idea waiting for its patch is pending, not a failure: 1 valid of 1 known
    assert (g1["ideas"], g1["valid"], g1["pending"], g1["execution_rate"]) == (2, 1, 1, 1.0)
    assert (g1["best_score"], g1["mean_score"], g1["best_so_far_score"]) == (2.0, 2.0, 3.0)
    assert a["totals"] == {
        "ideas": 6,
        "valid": 3,
        "pending": 1,
        "execution_rate": 3 / 5,
        "failures": {"patch failed (apply)": 1, "run failed": 1},
    }
    assert a["baseline"] == {"scores": [0.5, 0.7], "mean": pytest.approx(0.6)}
    assert a["status"] == "running"
    # LLM ideas whose patch changes X (an UPPER_CASE constant) only: hyper-parameter
    assert a["classes"]["hyperparameter"]["ideas"] == 4
    # the failed patch and the pending idea: no patch to read a class from
    assert a["classes"]["unclassified"]["ideas"] == 2
    assert g0["classes"]["hyperparameter_share"] == 1.0
    assert json.loads(json.dumps(a)) == a  # plain JSON values, for the dashboard


def test_best_follows_reward_so_a_minimised_metric_picks_the_lowest_score() -> None:
    start = search_started("loss")
    ideas = [idea_proposed("loss", n, text=f"idea number {n}") for n in range(2)]
    events: list[ev.Event] = [start, *ideas]
    for idea, loss in zip(ideas, [3.2, 2.9], strict=True):
        events.append(
            run_result(
                "loss", f"r{loss}", score=loss, reward=1 / loss, idea_id=idea.idea_id, generation=0
            )
        )
    g0 = analyze_events(events)["generations"][0]
    assert g0["best_score"] == 2.9 and g0["mean_score"] == pytest.approx(3.05)


def test_constants_only_patch_is_hyperparameter_code_change_is_algorithmic() -> None:
    src = CONFIG["config.py"]
    tuned = config_diff(src.replace("MOMENTUM = 0.5", "MOMENTUM = 0.9  # tuned"))
    code = config_diff(src + "\n\ndef warmup(step):\n    return min(1.0, step / 100)\n")
    imported = config_diff("import math\n" + src)
    comment = config_diff(src.replace("# model width", "# the width"))
    for sources, method in [(CONFIG, "ast"), (None, "diff")]:
        hp = classify_idea(None, tuned, sources, KNOBS)
        assert (hp.label, hp.method, hp.constants) == ("hyperparameter", method, ("MOMENTUM",))
        assert classify_idea(None, code, sources, KNOBS).label == "algorithmic"
        assert classify_idea(None, imported, sources, KNOBS).label == "algorithmic"
        assert classify_idea(None, comment, sources, KNOBS).label == "unclassified"
    # a lower-case module variable is code, not a declared constant
    train = {"train.py": "lr = 0.1\nBATCH = 4\n\ndef step():\n    return lr * BATCH\n"}
    lower = make_diff(train, {"train.py": train["train.py"].replace("lr = 0.1", "lr = 0.2")})
    upper = make_diff(train, {"train.py": train["train.py"].replace("BATCH = 4", "BATCH = 8")})
    body = make_diff(train, {"train.py": train["train.py"].replace("lr * BATCH", "lr / BATCH")})
    assert classify_idea(None, lower, train).label == "algorithmic"
    assert classify_idea(None, upper, train).constants == ("BATCH",)
    assert "line 4" in classify_idea(None, body, train).reason
    # a baseline the diff does not apply to: the diff's lines decide
    assert classify_idea(None, upper, {"train.py": "BATCH = 1\n"}).method == "diff"
    new_file = make_diff({}, {"extra.py": "X = 1\n"})
    assert classify_idea(None, new_file, CONFIG).label == "algorithmic"
    assert classify_idea({"WIDTH": 64}, None).method == "knobs"
    assert classify_idea(None, None).label == "unclassified"


def test_distinct_fraction_and_tfidf_similarity_by_hand() -> None:
    assert distinct_fraction(["Raise the LR.", "raise  the lr", "Add dropout"]) == 2 / 3
    assert distinct_fraction([]) is None
    m = TfidfSimilarity().similarities(["a b c", "a b c", "x y z"])
    assert m[0][1] == pytest.approx(1.0) and m[0][2] == 0.0
    # "a b" vs "a c": idf(a) = ln(3/3) + 1 = 1, idf(b) = idf(c) = ln(3/2) + 1
    w = math.log(1.5) + 1
    assert TfidfSimilarity().similarities(["a b", "a c"])[0][1] == pytest.approx(1 / (1 + w * w))
    assert mean_pairwise([[1, 0.2, 0.4], [0.2, 1, 0.6], [0.4, 0.6, 1]], [0, 1, 2]) == pytest.approx(
        0.4
    )
    assert mean_pairwise([[1.0]], [0]) is None


def test_wordllama_embeddings_work_offline() -> None:
    measure = wordllama_measure()
    m = measure.similarities(
        [
            "Add dropout to the attention layers",
            "Add dropout to the attention layers",
            "Apply dropout inside every attention block",
            "Store the dataset as compressed parquet files",
        ]
    )
    assert m[0][1] == pytest.approx(1.0, abs=1e-6)
    assert m[0][2] > m[0][3] + 0.2  # a paraphrase is nearer than an unrelated idea
    assert "WordLlama" in choose_measure().name and choose_measure().note == ""


def test_a_model_the_system_cannot_load_is_refused_with_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(DiversityError, match="no such folder"):
        choose_measure(str(tmp_path / "missing"))
    (tmp_path / "modules.json").write_text("[]")
    if importlib.util.find_spec("sentence_transformers") is None:
        with pytest.raises(DiversityError, match="pip install sentence-transformers"):
            choose_measure(str(tmp_path))


def test_llm_judge_through_a_local_model_server() -> None:
    def answer(request: Request) -> Reply:
        label = "algorithmic" if "dropout" in request.last_user_text else "hyperparameter"
        return Reply(text=json.dumps({"label": label, "reason": "because"}), input_tokens=200)

    events = small_search()
    knob_free = [
        e.model_copy(update={"text": "Add dropout to every block"})
        if isinstance(e, ev.IdeaProposed) and e.title == "idea 0.1"
        else e
        for e in events
    ]
    with FakeLLMServer() as server:
        server.responder = answer
        client = make_client(
            f"openai-compatible:judge@{server.openai_base_url}", fast_settings(server, "k")
        )
        judge = IdeaJudge(client)
        a = analyze_events(knob_free, judge=judge)
        requests = server.requests_for("openai")
    assert len(requests) == 6  # one call per idea, none for the baseline
    assert all(r.body["response_format"]["type"] == "json_schema" for r in requests)
    assert a["judge"]["classes"]["algorithmic"]["ideas"] == 1
    assert a["judge"]["classes"]["algorithmic"]["mean_score"] == 3.0  # idea 0.1 scored 3
    assert a["judge"]["usage"]["input_tokens"] == 1200
    # the patch says hyper-parameter for the 4 patched ideas; the judge disagrees on one
    assert (a["judge"]["compared"], a["judge"]["agreement"]) == (4, 3 / 4)
    assert a["generations"][0]["judge_classes"]["hyperparameter"] == 3
    assert parse_verdict('```json\n{"label": "algorithmic", "reason": "x"}\n```').label == (
        "algorithmic"
    )
    assert parse_verdict("I think it is tuning").label == "unclassified"


def cli_env(settings: Settings) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("GROUNDLOOP_")}
    env.update(
        GROUNDLOOP_NATS_URL=settings.nats_url or "",
        GROUNDLOOP_DATA_DIR=str(settings.data_dir),
        GROUNDLOOP_SUBJECT_PREFIX=settings.subject_prefix,
        GROUNDLOOP_STREAM=settings.stream,
        GROUNDLOOP_DLQ_STREAM=settings.dlq_stream,
        GROUNDLOOP_ARTIFACTS_BUCKET=settings.artifacts_bucket,
        COLUMNS="200",
    )
    return env


async def test_cli_writes_analysis_and_plots_for_two_searches(
    settings: Settings, tmp_path: Path
) -> None:
    source = record_source().search("src")
    hand = small_search()
    bus = await Bus.connect(settings, "test-analyze")
    try:
        await publish_all(bus, source)
        await publish_all(bus, hand)
    finally:
        await bus.close()
    out = tmp_path / "out"
    done = subprocess.run(
        [*CLI, "analyze", "src", "hand", "-o", str(out)],
        env=cli_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    md = (out / "analysis.md").read_text()
    assert "## Side by side" in md and "## src: synthetic" in md and "## hand: synthetic" in md
    assert "WordLlama" in md and "syntax trees of synthetic's files" in md
    for name in ("execution_rate", "idea_classes", "diversity", "scores"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({name}.png)" in md
    written = json.loads((out / "analysis.json").read_text())
    assert [a["search_id"] for a in written] == ["src", "hand"]
    expected = analyze_events(source, sources=CONFIG, knob_names=KNOBS, measure=choose_measure())
    assert written[0]["generations"] == json.loads(json.dumps(expected["generations"]))
    assert written[1]["totals"]["execution_rate"] == 3 / 5
    # an unknown search is an error that says where to look
    missing = subprocess.run(
        [*CLI, "analyze", "nope", "-o", str(tmp_path / "x")],
        env=cli_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2 and "groundloop searches" in missing.stdout
