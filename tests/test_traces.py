"""Traces across services: one connected trace per idea, from its proposal through its patch,
pre-flight, run and evaluation, although every step runs in another process.

The ideator, implementer, runner, evolver and projector run as separate processes
(`python -m groundloop.<role>`) on a real nats-server with authentication, each exporting
spans over OTLP/HTTP (GROUNDLOOP_TRACES=otlp) to a receiver of the test's own
(tests/otlp_receiver.py), which decodes the real exporter's protobuf. The context crosses
processes only in the events' NATS headers.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from groundloop import events as ev
from groundloop.broker import NatsServer
from groundloop.bus import Bus
from groundloop.execution.environment import Environment
from groundloop.permissions import Names
from groundloop.settings import Settings
from tests.factories import search_started_in
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.waiting import eventually

pytestmark = pytest.mark.timeout(120)

SERVICES = {
    "ideator": ["-m", "groundloop.ideator"],
    "implementer": ["-m", "groundloop.implementer"],
    "runner": ["-m", "groundloop.runner", "--resource-class", "cpu", "--slots", "1"],
    "evolver": ["-m", "groundloop.evolver"],
    "api": ["-m", "groundloop.api", "--no-http"],
}
# The steps of one idea, each by the process that does it.
IDEA_STEPS = {
    "propose idea": "groundloop-ideator",
    "implementer IdeaProposed": "groundloop-implementer",
    "check candidate": "groundloop-implementer",
    "pre-flight": "groundloop-implementer",
    "pre-flight smoke": "groundloop-implementer",
    "runner-cpu PatchReady": "groundloop-runner",
    "materialise": "groundloop-runner",
    "run": "groundloop-runner",
    "evaluate": "groundloop-runner",
    "evolver RunCompleted": "groundloop-evolver",
    "projector RunCompleted": "groundloop-api",
}


def service_env(settings: Settings, nats: NatsServer, collector: str) -> dict[str, str]:
    """The settings as GROUNDLOOP_* variables: the test's broker names, the broker's
    credentials (each process logs in as its role), and traces to the test's collector."""
    values = {
        "nats_url": settings.nats_url,
        "nats_credentials_dir": nats.credentials,
        "data_dir": settings.data_dir,
        "db_url": settings.db_url,
        "subject_prefix": settings.subject_prefix,
        "stream": settings.stream,
        "dlq_stream": settings.dlq_stream,
        "artifacts_bucket": settings.artifacts_bucket,
        "environments_dir": settings.environments_dir,
        "traces": "otlp",
        "otlp_endpoint": collector,  # the bare address: /v1/traces is added
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GROUNDLOOP_", "OTEL_"))}
    return {**env, **{f"GROUNDLOOP_{k.upper()}": str(v) for k, v in values.items()}}


def start(name: str, env: dict[str, str], logs: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *SERVICES[name]],
        env=env,
        stdout=(logs / f"{name}.log").open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop_all(procs: dict[str, subprocess.Popen], logs: Path) -> None:
    """SIGTERM (each process exports its last spans as it exits), then wait."""
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for name, proc in procs.items():
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"{name} ignored SIGTERM:\n{(logs / f'{name}.log').read_text()[-3000:]}")


async def search_to_completion(settings: Settings, started: ev.SearchStarted) -> list[ev.Event]:
    bus = await Bus.connect(settings, "t")
    try:
        await bus.publish(started)

        async def ended() -> list[ev.Event] | None:
            log = [e async for e in bus.events(started.search_id)]
            stopped = [e for e in log if isinstance(e, ev.SearchStopped)]
            assert not stopped, f"the search stopped: {stopped[0].reason}"
            return log if any(isinstance(e, ev.SearchCompleted) for e in log) else None

        return await eventually(ended, timeout=75, what="SearchCompleted", interval=0.5)
    finally:
        await bus.close()


@dataclass
class TracedSearch:
    log: list[ev.Event]
    spans: list[ReceivedSpan]
    seconds: float

    def trace_of(self, idea: ev.IdeaProposed) -> tuple[ReceivedSpan, list[ReceivedSpan]]:
        """The idea's root span (its one "propose idea") and every span of its trace."""
        [root] = [
            s
            for s in self.spans
            if s.name == "propose idea" and s.attributes.get("groundloop.idea_id") == idea.idea_id
        ]
        return root, [s for s in self.spans if s.trace_id == root.trace_id]


@pytest.fixture(scope="module")
def traced(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> TracedSearch:
    """A search of 2 generations × 2 ideas by the services as separate processes, traced."""
    t0 = time.monotonic()
    root = tmp_path_factory.mktemp("traced")
    settings = Settings(
        nats_url=nats_server.url,
        nats_credentials_dir=nats_server.credentials,
        data_dir=root / "data",
        db_url=f"sqlite:///{root / 'projections.db'}",
        subject_prefix="traced",
        stream="GL_TRACED",
        dlq_stream="GLDLQ_TRACED",
        artifacts_bucket="art_traced",
    )
    nats_server.serve(Names.of(settings))
    env = Environment.load("synthetic", settings.environments_dir)
    started = search_started_in(
        env,
        "traced",
        generations=2,
        ideas_per_generation=2,
        baseline_seeds=1,
        final_top_k=1,
        final_seeds=1,
    )
    logs = root / "logs"
    logs.mkdir()
    with OtlpReceiver() as collector:
        environ = service_env(settings, nats_server, collector.url)
        procs = {name: start(name, environ, logs) for name in SERVICES}
        try:
            log = asyncio.run(search_to_completion(settings, started))
        except BaseException:
            stop_all(procs, logs)
            for name in SERVICES:
                print(f"--- {name}\n{(logs / f'{name}.log').read_text()[-1500:]}")
            raise
        stop_all(procs, logs)
        assert not collector.errors, collector.errors
        spans = collector.spans
    return TracedSearch(log, spans, time.monotonic() - t0)


def test_each_idea_is_one_connected_trace_across_the_services(traced: TracedSearch):
    log, spans = traced.log, traced.spans
    ideas = [e for e in log if isinstance(e, ev.IdeaProposed)]
    ran = {e.idea_id for e in log if isinstance(e, ev.RunCompleted) and e.idea_id}
    assert len(ideas) == 4 and {i.idea_id for i in ideas} <= ran, "every idea ran"
    summary = []
    for idea in ideas:
        root, trace = traced.trace_of(idea)
        names = {s.name for s in trace}
        missing = sorted(step for step in IDEA_STEPS if step not in names)
        assert not missing, f"idea {idea.idea_id}: its trace lacks {missing}; has {names}"
        for s in trace:
            if s.name in IDEA_STEPS and s.attributes.get("groundloop.idea_id") == idea.idea_id:
                assert s.service == IDEA_STEPS[s.name], f"{s.name} sent by {s.service}"
        # Exactly one trace holds the idea's own steps (a final re-evaluation of the idea is a
        # run of its own: a RunRequested begins a trace).
        holders = {
            s.trace_id
            for s in spans
            if s.attributes.get("groundloop.idea_id") == idea.idea_id
            and s.name in IDEA_STEPS
            and s.attributes.get("groundloop.purpose", "search") == "search"
        }
        assert holders == {root.trace_id}, f"idea {idea.idea_id} spread over {holders}"
        # Connected: one root; every other span's parent is in the trace.
        ids = {s.span_id for s in trace}
        assert [s for s in trace if not s.parent_span_id] == [root]
        assert all(s.parent_span_id in ids for s in trace if s is not root)
        # The root links to the span of the ideator's handling of its generation.
        [(linked_trace, linked_span)] = root.links
        [generation] = [s for s in spans if s.span_id == linked_span]
        assert generation.name == "ideator GenerationAdvanced" and linked_trace != root.trace_id
        # The idea's spans name the search and the idea; the runner's the patch and run too.
        patch = next(e for e in log if isinstance(e, ev.PatchReady) and e.idea_id == idea.idea_id)
        run = next(e for e in log if isinstance(e, ev.RunCompleted) and e.idea_id == idea.idea_id)
        for s in trace:
            assert s.attributes.get("groundloop.search_id") == "traced", s
        own = [s for s in trace if s.attributes.get("groundloop.idea_id") == idea.idea_id]
        assert {s.name for s in own} >= set(IDEA_STEPS)
        for s in own:
            if s.service == "groundloop-runner":
                assert s.attributes.get("groundloop.patch_id") == patch.patch_id, s
                assert s.attributes.get("groundloop.run_id") == run.run_id, s
        services = {s.service for s in trace}
        assert len(services) >= 3, services
        summary.append((len(trace), len(services)))
    print(f"(spans, processes) per idea's trace: {summary}; {traced.seconds:.1f} s in all")


def test_an_ideas_trace_holds_only_that_ideas_work(traced: TracedSearch):
    for idea in (e for e in traced.log if isinstance(e, ev.IdeaProposed)):
        _root, trace = traced.trace_of(idea)
        strays = {
            (s.name, s.attributes.get("groundloop.idea_id"))
            for s in trace
            if s.attributes.get("groundloop.idea_id") != idea.idea_id
        }
        assert not strays, f"idea {idea.idea_id}'s trace holds other work: {sorted(strays)}"
