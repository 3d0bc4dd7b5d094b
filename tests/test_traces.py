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
import time
from dataclasses import dataclass

import pytest

from groundloop import events as ev
from groundloop.broker import NatsServer
from groundloop.bus import Bus
from groundloop.execution.environment import Environment
from groundloop.settings import Settings
from tests.factories import search_started_in
from tests.fleet import Fleet, settings_for
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


def stop(fleet: Fleet) -> None:
    """SIGTERM (each process exports its last spans as it exits), then wait."""
    ignored = fleet.stop(timeout=30)
    if ignored:
        pytest.fail(f"{', '.join(ignored)} ignored SIGTERM:\n{fleet.tails(3000)}")


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
    settings = settings_for(nats_server, root, "TRACED")
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
    with OtlpReceiver() as collector:
        # Every process exports its spans to the test's collector (the bare address: the
        # exporter adds /v1/traces).
        overrides = {"traces": "otlp", "otlp_endpoint": collector.url}
        fleet = Fleet(settings, root / "logs", SERVICES, overrides)
        fleet.start_all(dict.fromkeys(SERVICES, 1))
        try:
            log = asyncio.run(search_to_completion(settings, started))
        except BaseException:
            stop(fleet)
            print(fleet.tails(1500))
            raise
        stop(fleet)
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
