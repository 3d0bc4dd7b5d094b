"""The implementer: knob edits, pre-flight, the LLM revision loop through a local model server,
and the ideator + implementer services over a real nats-server."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from groundloop import events as ev
from groundloop.execution.applier import make_diff
from groundloop.execution.environment import Environment
from groundloop.ideator.history import SearchHistory
from groundloop.ideator.service import IdeatorDeps, propose
from groundloop.implementer.knob_edit import KnobEditError, knob_sources, set_constants
from groundloop.implementer.llm_patch import extract_patch
from groundloop.implementer.service import ImplementerDeps, handle
from groundloop.llm.client import ClientCache, LLMError, LLMSettings
from tests.paths import REPO_ROOT
from tests.llm_server import FakeLLMServer, Reply

SECRET = "sk-implementer-test"
ENVIRONMENTS = REPO_ROOT / "environments"


@pytest.fixture
def synthetic() -> Environment:
    return Environment.load("synthetic")


@pytest.fixture
def server():
    with FakeLLMServer() as s:
        yield s


def started_for(
    env: Environment,
    implementer: ev.ImplementerSettings | None = None,
    search_id: str = "s1",
    prices: dict | None = None,
) -> ev.SearchStarted:
    return ev.SearchStarted(
        event_id=ev.stable_id(search_id, "started"),
        search_id=search_id,
        producer="cli",
        environment=env.name,
        environment_digest=env.digest(),
        strategy="evolution",
        config=ev.SearchConfig(generations=2, ideas_per_generation=4),
        proposer=ev.ProposerSettings(kind="knobs"),
        implementer=implementer or ev.ImplementerSettings(kind="knobs"),
        price_table=prices or {},
        seed=1,
    )


def an_idea(
    search_id: str = "s1",
    mode: str = "fresh",
    knobs: dict | None = None,
    n: int = 0,
    text: str = "Raise the learning rate to 1e-2 in config.py.",
) -> ev.IdeaProposed:
    return ev.IdeaProposed(
        event_id=ev.stable_id(search_id, "idea-event", n),
        search_id=search_id,
        producer="ideator",
        idea_id=ev.stable_id(search_id, 0, n),
        generation=0,
        mode=mode,
        title="raise the learning rate",
        text=text,
        proposer=ev.ProposerInfo(kind="llm" if knobs is None else "knobs"),
        knobs=knobs,
    )


def make_deps(
    tmp: Path,
    env: Environment,
    started: ev.SearchStarted,
    server: FakeLLMServer | None = None,
    **overrides,
) -> ImplementerDeps:
    settings = LLMSettings(
        openai_api_key=SECRET,
        anthropic_api_key=SECRET,
        openai_base_url=server.openai_base_url if server else None,
        anthropic_base_url=server.anthropic_base_url if server else None,
        backoff_initial_s=0.01,
        backoff_max_s=0.02,
        max_attempts=2,
        max_total_s=20,
        timeout_s=10,
    )
    values = dict(
        search=lambda _s: started,
        environment=lambda _n: env,
        llm=ClientCache(settings),
        work_dir=tmp / "work",
        cache_dir=tmp / "cache",
    )
    values.update(overrides)
    return ImplementerDeps(**values)


def config_diff(env: Environment, old: str, new: str) -> str:
    text = env.editable_sources()["config.py"]
    assert old in text
    return make_diff({"config.py": text}, {"config.py": text.replace(old, new)})


# ---------------------------------------------------------------------------- knob edits


def test_set_constants_edits_only_module_level_values():
    source = (
        '"""doc: X = 1"""\nX = 1  # keep this comment\nY: float = 2e-3\n'
        'def f():\n    X = 5\n    return X\nlabel = "X = 9"\nZ = (1,\n     2)\n'
    )
    out = set_constants(source, {"X": "7", "Y": "0.005", "Z": "3"}, "t.py")
    assert out == (
        '"""doc: X = 1"""\nX = 7  # keep this comment\nY: float = 0.005\n'
        'def f():\n    X = 5\n    return X\nlabel = "X = 9"\nZ = 3\n'
    )
    with pytest.raises(KnobEditError, match=r"no module-level assignment for \['W'\]"):
        set_constants(source, {"W": "1"}, "t.py")


def test_knob_values_are_checked_against_the_manifest(synthetic):
    m, sources = synthetic.manifest, synthetic.editable_sources()
    after = knob_sources(
        m, sources, {"LEARNING_RATE": 0.003, "WIDTH": 64.0, "SCHEDULE": "cosine", "USE_WARMUP": 1}
    )
    text = after["config.py"]
    assert "LEARNING_RATE = 0.003  # step size" in text and "WIDTH = 64  #" in text
    assert 'SCHEDULE = "cosine"' in text and "USE_WARMUP = True" in text
    for bad, reason in [
        ({"LEARNING_RATE": 5.0}, "outside its declared range"),
        ({"WIDTH": 33.5}, "not a whole number"),
        ({"SCHEDULE": "step"}, "not one of its choices"),
        ({"NOPE": 1}, "declares no knob 'NOPE'"),
        ({"MOMENTUM": "fast"}, "not a number"),
        ({}, "sets no knobs"),
    ]:
        with pytest.raises(KnobEditError, match=reason):
            knob_sources(m, sources, bad)


def test_knob_idea_becomes_a_preflighted_patch(tmp_path, synthetic):
    started = started_for(synthetic)
    [patch] = handle(
        an_idea(knobs={"LEARNING_RATE": 0.01, "MOMENTUM": 0.9}),
        make_deps(tmp_path, synthetic, started),
    )
    assert isinstance(patch, ev.PatchReady)
    assert patch.patch_id == ev.stable_id(patch.idea_id, "patch") and patch.files_changed == [
        "config.py"
    ]
    assert patch.implementer == ev.ImplementerInfo(kind="knobs") and patch.usage == ev.Usage()
    assert "+LEARNING_RATE = 0.01  # step size" in patch.diff and "+MOMENTUM = 0.9  #" in patch.diff
    assert [c.name for c in patch.preflight.checks] == ["compile", "protected", "smoke"]
    assert patch.preflight.passed and all(c.seconds >= 0 for c in patch.preflight.checks)
    assert (patch.resource_class, patch.seed, patch.environment_digest) == (
        "cpu",
        0,
        synthetic.digest(),
    )
    made = synthetic.materialize(tmp_path / "again", patch.diff)  # what a runner will do
    assert (made.patched_digest, made.diff_digest) == (patch.patched_digest, patch.diff_digest)
    assert not list((tmp_path / "work").iterdir())  # scratch workspaces are cleaned up


def test_baseline_idea_is_the_empty_diff(tmp_path, synthetic):
    [patch] = handle(
        an_idea(mode="baseline", knobs=None), make_deps(tmp_path, synthetic, started_for(synthetic))
    )
    assert patch.diff == "" and patch.files_changed == [] and patch.implementer.kind == "none"
    assert patch.preflight.passed


def test_bad_knobs_and_a_changed_environment_are_rejected(tmp_path, synthetic):
    started = started_for(synthetic)
    [failed] = handle(
        an_idea(knobs={"LEARNING_RATE": 99.0}), make_deps(tmp_path, synthetic, started)
    )
    assert (
        isinstance(failed, ev.PatchFailed)
        and failed.stage == "rejected"
        and "outside" in failed.last_error
    )
    stale = started.model_copy(update={"environment_digest": "0" * 64})
    [failed] = handle(an_idea(knobs={"LEARNING_RATE": 0.01}), make_deps(tmp_path, synthetic, stale))
    assert failed.stage == "rejected" and "changed since the search started" in failed.last_error


def test_llm_idea_without_a_model_fails_clearly(tmp_path, synthetic):
    [failed] = handle(an_idea(), make_deps(tmp_path, synthetic, started_for(synthetic)))
    assert failed.stage == "model" and "implementer kind 'llm'" in failed.last_error


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the module, so an environment's prepare step runs once."""
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize(
    "name",
    [
        "synthetic",
        pytest.param("tinygpt", marks=pytest.mark.slow),
        pytest.param("tinygrpo", marks=pytest.mark.slow),
    ],
)
def test_knob_proposer_ideas_pass_preflight(tmp_path, shared_cache, name):
    if not (ENVIRONMENTS / name / "manifest.toml").is_file():
        pytest.skip(f"environment {name} does not exist yet")
    env = Environment.load(name)
    if not env.manifest.knobs:
        pytest.skip(f"environment {name} declares no knobs")
    started = started_for(env)
    history = SearchHistory.from_events("s1", [started])
    gen0 = ev.GenerationAdvanced(
        search_id="s1", producer="evolver", generation=0, plan=ev.GenerationPlan(fresh=2)
    )
    ideas = propose(
        gen0,
        IdeatorDeps(history=history, environment=lambda _n: env, llm=ClientCache(LLMSettings())),
    ).events
    assert len(ideas) == 2
    for idea in ideas:
        [patch] = handle(idea, make_deps(tmp_path, env, started, cache_dir=shared_cache))
        assert isinstance(patch, ev.PatchReady), patch.last_error
        assert patch.preflight.passed and patch.files_changed
        assert next(c for c in patch.preflight.checks if c.name == "smoke").ok


# ---------------------------------------------------------------------------- the LLM path


def test_extract_patch_formats(synthetic):
    sources = synthetic.editable_sources()
    diff = config_diff(synthetic, "MOMENTUM = 0.5", "MOMENTUM = 0.8")
    assert extract_patch(f"Here is the patch:\n```diff\n{diff}```\nThat's it.", sources) == diff
    assert extract_patch(diff, sources) == diff
    blocks = "config.py\n<<<<<<< SEARCH\nMOMENTUM = 0.5  # 0 .. 0.99\n=======\nMOMENTUM = 0.8  # 0 .. 0.99\n>>>>>>> REPLACE\n"
    assert extract_patch("Sure.\n" + blocks, sources) == diff
    with pytest.raises(Exception, match="no unified diff"):
        extract_patch("I changed the momentum for you.", sources)


def test_revision_loop_apply_error_then_preflight_error_then_success(tmp_path, synthetic, server):
    prices = {"openai:gpt-5": ev.ModelPrice(input_per_mtok=1.0, output_per_mtok=10.0)}
    started = started_for(
        synthetic,
        ev.ImplementerSettings(kind="llm", model="openai:gpt-5", samples=1, revisions=2),
        prices=prices,
    )
    stale_context = (
        "```diff\n--- a/config.py\n+++ b/config.py\n@@ -6,2 +6,2 @@\n-LEARNING_RATE = 3e-4\n"
        "+LEARNING_RATE = 1e-2\n MOMENTUM = 0.5  # 0 .. 0.99\n```\n"
    )
    crashes = (
        "config.py\n<<<<<<< SEARCH\nLEARNING_RATE = 1e-3  # step size (log scale, 1e-4 .. 1e-1)\n=======\n"
        "LEARNING_RATE = -1.0\n>>>>>>> REPLACE\n"
    )
    good = (
        "```diff\n" + config_diff(synthetic, "LEARNING_RATE = 1e-3", "LEARNING_RATE = 1e-2") + "```"
    )
    server.enqueue(
        Reply(text=stale_context, input_tokens=1000, output_tokens=100),
        Reply(text=crashes, input_tokens=1500, output_tokens=80),
        Reply(text="Fixed:\n" + good, input_tokens=2000, output_tokens=90),
    )
    [patch] = handle(an_idea(), make_deps(tmp_path, synthetic, started, server))

    assert isinstance(patch, ev.PatchReady) and patch.attempts == 3
    assert patch.implementer == ev.ImplementerInfo(kind="llm", model="openai:gpt-5")
    assert (patch.usage.calls, patch.usage.input_tokens, patch.usage.output_tokens) == (
        3,
        4500,
        270,
    )
    assert patch.usage.cost_usd == pytest.approx((4500 * 1 + 270 * 10) / 1e6)
    assert "+LEARNING_RATE = 1e-2" in patch.diff and patch.preflight.passed
    first, second, third = (r.body["messages"] for r in server.requests)
    prompt = next(m["content"] for m in first if m["role"] == "user")
    assert "## config.py (editable)" in prompt and "run.py: protected" in prompt
    assert "def score(" not in prompt  # the protected evaluation is never shown
    assert (
        "could not be applied" in second[-1]["content"]
        and "LEARNING_RATE = 3e-4" in second[-1]["content"]
    )
    assert second[-2] == {"role": "assistant", "content": stale_context}
    assert "failed pre-flight" in third[-1]["content"] and "smoke" in third[-1]["content"]
    assert (
        "math domain error" in third[-1]["content"]
    )  # the smoke run's traceback reaches the model


def test_revisions_exhausted_give_patch_failed_with_the_last_error(tmp_path, synthetic, server):
    started = started_for(
        synthetic,
        ev.ImplementerSettings(
            kind="llm", model="anthropic:claude-sonnet-4-5", samples=1, revisions=1
        ),
    )
    protected = "```diff\n--- a/run.py\n+++ b/run.py\n@@ -1 +1 @@\n-x\n+y\n```"
    escape = "```diff\n--- a/../outside.py\n+++ b/../outside.py\n@@ -0,0 +1 @@\n+pwned = 1\n```"
    server.enqueue(Reply(text=protected), Reply(text=escape))
    [failed] = handle(an_idea(), make_deps(tmp_path, synthetic, started, server))
    assert isinstance(failed, ev.PatchFailed) and failed.stage == "apply" and failed.attempts == 2
    assert "'..'" in failed.last_error and failed.usage.calls == 2
    assert "run.py is protected" in server.requests[1].last_user_text
    assert (
        not (tmp_path / "outside.py").exists() and not (tmp_path / "work" / "outside.py").exists()
    )


def test_parallel_samples_first_passing_wins_and_all_calls_are_paid(tmp_path, synthetic, server):
    started = started_for(
        synthetic, ev.ImplementerSettings(kind="llm", model="openai:gpt-5", samples=3, revisions=1)
    )
    good = "```diff\n" + config_diff(synthetic, "WIDTH = 32", "WIDTH = 128") + "```"
    answers = iter([Reply(text="no idea"), Reply(text=good), Reply(text=good)])
    server.responder = lambda request: next(answers, Reply(text=good))
    [patch] = handle(an_idea(), make_deps(tmp_path, synthetic, started, server))
    assert isinstance(patch, ev.PatchReady) and "+WIDTH = 128" in patch.diff
    assert patch.usage.calls == len(server.requests) >= 2
    assert 2 <= patch.attempts <= 6


def test_provider_down_is_retried_later_and_missing_key_fails(
    tmp_path, synthetic, server, monkeypatch
):
    started = started_for(
        synthetic, ev.ImplementerSettings(kind="llm", model="openai:gpt-5", samples=2, revisions=1)
    )
    server.responder = lambda request: Reply(status=503)
    with pytest.raises(LLMError, match="gave up") as info:
        handle(an_idea(), make_deps(tmp_path, synthetic, started, server))
    assert info.value.retryable  # run() naks the idea for a later delivery
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("GROUNDLOOP_OPENAI_API_KEY", raising=False)
    deps = make_deps(tmp_path, synthetic, started, llm=ClientCache(LLMSettings()))
    [failed] = handle(an_idea(), deps)
    assert failed.stage == "model" and "export OPENAI_API_KEY" in failed.last_error


def test_large_diffs_go_to_the_object_store(tmp_path, synthetic):
    stored: dict[str, bytes] = {}

    def put(key: str, data: bytes) -> str:
        stored[key] = data
        return key

    deps = make_deps(
        tmp_path, synthetic, started_for(synthetic), put_artifact=put, inline_limit=100
    )
    [patch] = handle(an_idea(knobs={"WIDTH": 100}), deps)
    assert patch.diff is None and patch.diff_key == f"diffs/s1/{patch.patch_id}.diff"
    made = synthetic.materialize(tmp_path / "ws", stored[patch.diff_key].decode())
    assert made.diff_digest == patch.diff_digest and made.patched_digest == patch.patched_digest


# ---------------------------------------------------------------------------- over NATS


async def test_ideator_and_implementer_services_over_nats(settings, synthetic):
    from groundloop.bus import Bus
    from groundloop.ideator.service import run as run_ideator
    from groundloop.implementer.service import run as run_implementer

    bus = await Bus.connect(settings, "test")
    outcomes: asyncio.Queue[ev.Event] = asyncio.Queue()

    async def on_message(msg) -> None:
        event = ev.decode(msg.data)
        if isinstance(event, ev.PatchReady | ev.PatchFailed):
            await outcomes.put(event)

    watch = await bus.nc.subscribe(bus.subject_filter(search_id="nats1"), cb=on_message)
    stop = asyncio.Event()
    services = [
        asyncio.create_task(run_ideator(settings, stop)),
        asyncio.create_task(run_implementer(settings, stop, work_dir=settings.data_dir / "impl")),
    ]
    try:
        started = started_for(synthetic, search_id="nats1")
        await bus.publish(started)
        gen = ev.GenerationAdvanced(
            event_id=ev.stable_id("nats1", "gen", 0),
            search_id="nats1",
            producer="evolver",
            generation=0,
            plan=ev.GenerationPlan(fresh=3),
        )
        await bus.publish(gen, once_per_subject=True)
        patches = [await asyncio.wait_for(outcomes.get(), timeout=60) for _ in range(3)]
        ideas = [e async for e in bus.events("nats1") if isinstance(e, ev.IdeaProposed)]
        assert len(ideas) == 3 and all(i.proposer.kind == "knobs" for i in ideas)
        assert all(isinstance(p, ev.PatchReady) and p.preflight.passed for p in patches)
        assert {p.idea_id for p in patches} == {i.idea_id for i in ideas}
    finally:
        stop.set()
        await watch.unsubscribe()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*services), timeout=20)
        await bus.close()
