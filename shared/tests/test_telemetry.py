"""groundloop.telemetry in one process: which trace each published event carries, the ids
spans carry, context carried into thread pools, and settings refused with a clear message.
(tests/test_traces.py follows the traces across the services as separate processes.)"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from groundloop import events as ev
from groundloop import telemetry
from groundloop.settings import Settings
from tests.factories import generation_advanced, idea, patch_ready, search_started


@pytest.fixture
def spans(tmp_path: Path) -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    telemetry.configure_tracing(Settings(traces="console", data_dir=tmp_path), "test", exporter)
    yield exporter
    telemetry.shutdown_tracing()


def published_trace(headers: dict[str, str]) -> tuple[int, int]:
    """(trace id, span id) a published event's headers carry."""
    ctx = TraceContextTextMapPropagator().extract(headers)
    span = next(iter(ctx.values())).get_span_context()  # type: ignore[attr-defined]
    return span.trace_id, span.span_id


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def ideas_of(generation: ev.GenerationAdvanced, count: int) -> list[ev.IdeaProposed]:
    return [idea(generation, slot) for slot in range(count)]


def test_each_idea_a_handler_returns_is_published_in_a_trace_of_its_own(spans):
    generation = generation_advanced(search_started("s1"), 0, ev.GenerationPlan(fresh=2))
    with telemetry.tracer().start_as_current_span("ideator GenerationAdvanced") as consumer:
        with telemetry.handling("ideator", generation) as handling:
            ideas = ideas_of(generation, 2)
            handling.emitted(ideas)
            # as Bus.publish does: only the message id names the event
            carried = [
                published_trace(telemetry.inject({"Nats-Msg-Id": i.event_id})) for i in ideas
            ]
            other = published_trace(telemetry.inject({"Nats-Msg-Id": "an-event-of-no-idea"}))
    handler = consumer.get_span_context()
    roots = named(spans, "propose idea")
    assert [r.attributes["groundloop.idea_id"] for r in roots] == [i.idea_id for i in ideas]
    assert carried == [(r.context.trace_id, r.context.span_id) for r in roots]
    assert len({trace for trace, _ in carried} | {handler.trace_id}) == 3
    for root in roots:
        assert root.parent is None and [link.context for link in root.links] == [handler]
        assert root.attributes["groundloop.role"] == "ideator"
        assert root.start_time <= root.end_time  # type: ignore[operator]
    assert other == (handler.trace_id, handler.span_id)  # any other event continues the handler
    [handled] = named(spans, "ideator GenerationAdvanced")
    assert handled.attributes["groundloop.generation"] == 0
    assert handled.attributes["groundloop.event_type"] == "GenerationAdvanced"


def test_a_publisher_that_passes_the_event_begins_its_trace_once(spans):
    started = search_started("s1")
    generation = generation_advanced(started, 1, ev.GenerationPlan(fresh=2))
    with telemetry.tracer().start_as_current_span("evolver RunCompleted") as consumer:
        first = published_trace(telemetry.inject({}, generation))
        again = published_trace(telemetry.inject({}, generation))  # a guarded re-publish
        completed = published_trace(telemetry.inject({}, started))
    [root] = named(spans, "advance generation")
    assert first == again == (root.context.trace_id, root.context.span_id)
    assert [link.context for link in root.links] == [consumer.get_span_context()]
    assert completed[0] == consumer.get_span_context().trace_id


def test_steps_carry_the_ids_learnt_while_handling_and_the_outputs_ones(spans):
    proposed = idea(generation_advanced(search_started("s1"), 0, ev.GenerationPlan(fresh=1)), 0)
    patch = patch_ready(proposed)
    with telemetry.tracer().start_as_current_span("implementer IdeaProposed"):
        with telemetry.handling("implementer", proposed) as handling:
            with telemetry.step("check candidate", attempt=1):
                telemetry.finished_step("pre-flight smoke", 0.25, passed=True)
            handling.emitted([patch])
    with telemetry.tracer().start_as_current_span("runner-cpu PatchReady"):
        with telemetry.handling("runner-cpu", patch):
            telemetry.annotate(run_id="run-1", purpose=None)
            with telemetry.step("run"):
                pass
    [check], [smoke] = named(spans, "check candidate"), named(spans, "pre-flight smoke")
    assert check.attributes["groundloop.idea_id"] == proposed.idea_id
    assert check.attributes["groundloop.attempt"] == 1
    assert "groundloop.patch_id" not in check.attributes  # no patch yet then
    assert smoke.parent.span_id == check.context.span_id  # type: ignore[union-attr]
    assert (smoke.end_time - smoke.start_time) == 250_000_000  # type: ignore[operator]
    [implementer] = named(spans, "implementer IdeaProposed")
    assert implementer.attributes["groundloop.patch_id"] == patch.patch_id  # from its output
    [run], [runner] = named(spans, "run"), named(spans, "runner-cpu PatchReady")
    for span in (run, runner):
        assert span.attributes["groundloop.run_id"] == "run-1"
        assert span.attributes["groundloop.patch_id"] == patch.patch_id
        assert "groundloop.purpose" not in span.attributes


def test_carried_keeps_the_trace_in_a_thread_pool(spans):
    def check() -> None:
        with telemetry.step("check candidate"):
            pass

    with telemetry.tracer().start_as_current_span("implement with model") as parent:
        with ThreadPoolExecutor(2) as pool:
            pool.submit(telemetry.carried(check)).result()
            pool.submit(check).result()  # what the pool does with no help: a new trace
    carried, lost = named(spans, "check candidate")
    assert carried.parent.span_id == parent.get_span_context().span_id  # type: ignore[union-attr]
    assert lost.parent is None


def test_settings_that_cannot_be_honoured_are_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="'jaeger' is not a trace exporter: use one of none"):
        telemetry.configure_tracing(Settings(traces="jaeger", data_dir=tmp_path), "test")
    assert telemetry.configure_tracing(Settings(traces="none", data_dir=tmp_path), "t") is None
    with pytest.raises(ValueError, match="is not an http"):
        telemetry.otlp_traces_url("collector:4318")
    assert telemetry.otlp_traces_url("http://c:4318") == "http://c:4318/v1/traces"
    assert telemetry.otlp_traces_url("http://c:4318/") == "http://c:4318/v1/traces"
    assert telemetry.otlp_traces_url("https://c/otlp/v1/traces") == "https://c/otlp/v1/traces"
