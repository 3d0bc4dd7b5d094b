"""Logging and tracing, configured once per process from Settings.

Traces follow the work, not the bus. Trace context travels in NATS headers as W3C
`traceparent`: the publisher injects it (`inject`), the consumer loop extracts it and handles
the event in a child span, and every event published while handling carries that span on.
Some events begin work of their own (`BEGINS_TRACE`: an idea, a generation, a requested run):
each gets a new root span, linked to the span that produced it, and is published carrying its
root rather than its producer's span. The root is begun when a handler returns the event
(`Handling.emitted`, from the skeleton), or when it is published where the publisher passes
the event to `inject` (a producer that publishes by itself, like the evolver). So one idea's
events (IdeaProposed → PatchReady → RunStarted → RunCompleted) share one trace, and each of
the ideas one GenerationAdvanced produced has its own:

    propose idea                           ideator (root; linked to the generation's span)
    ├─ implementer IdeaProposed            implementer
    │  ├─ check candidate                  apply, materialise, pre-flight
    │  │  └─ pre-flight                    └─ pre-flight compile, protected, smoke
    │  └─ runner-cpu PatchReady            runner
    │     ├─ materialise
    │     ├─ run                           └─ train, evaluate
    │     └─ evolver RunCompleted, projector RunCompleted, …
    └─ evolver IdeaProposed, projector IdeaProposed, …

Every span carries the ids known where it runs: groundloop.search_id, .generation, .idea_id,
.patch_id, .run_id (and a run's .purpose), and the handling span groundloop.role and
.event_type. Exporter: none, console, or OTLP over HTTP (GROUNDLOOP_OTLP_ENDPOINT; a bare http://host:4318 gets the
standard /v1/traces path).
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ParamSpec, TypeVar
from urllib.parse import urlsplit

from opentelemetry import context, propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from groundloop.settings import Settings

_PROPAGATOR = TraceContextTextMapPropagator()
_TRACER_NAME = "groundloop"
TRACE_EXPORTERS = ("none", "console", "otlp")

# Events that begin a unit of work of their own, and the name of the root span each gets.
BEGINS_TRACE = {
    "IdeaProposed": "propose idea",
    "GenerationAdvanced": "advance generation",
    "RunRequested": "request run",
}
# Event fields that identify the work (and a run's purpose); spans carry them as
# groundloop.<field>.
ID_FIELDS = ("search_id", "generation", "idea_id", "patch_id", "run_id", "purpose")
_HANDLING = context.create_key("groundloop-handling")
# Root contexts of events about to be published, by event id (= their Nats-Msg-Id). Bounded:
# a handler that fails after emitting leaves entries that nothing will ever publish.
_BEGUN: OrderedDict[str, context.Context] = OrderedDict()
_BEGUN_LIMIT = 10_000
_configured: dict[str, TracerProvider] = {}

P = ParamSpec("P")
R = TypeVar("R")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            entry["trace_id"] = f"{span.trace_id:032x}"
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter()
        if settings.log_json
        else logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    logging.getLogger("nats").setLevel(logging.WARNING)


def otlp_traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL: `endpoint` as given when it names a path, else with the
    standard /v1/traces (a collector's address, http://collector:4318, is enough)."""
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(
            f"GROUNDLOOP_OTLP_ENDPOINT={endpoint!r} is not an http(s) URL: give the collector's "
            "OTLP/HTTP address, e.g. http://otel-collector:4318"
        )
    return endpoint if parts.path.strip("/") else endpoint.rstrip("/") + "/v1/traces"


def configure_tracing(
    settings: Settings, service: str, exporter: SpanExporter | None = None
) -> TracerProvider | None:
    """Install a tracer provider for this process (service.name `groundloop-<service>`);
    `exporter` overrides the settings (tests). Returns the provider, to be shut down on exit
    so the last spans are exported, or None when tracing is off."""
    if settings.traces not in TRACE_EXPORTERS:
        raise ValueError(
            f"GROUNDLOOP_TRACES={settings.traces!r} is not a trace exporter: use one of "
            f"{', '.join(TRACE_EXPORTERS)}"
        )
    if exporter is None:
        if settings.traces == "console":
            exporter = ConsoleSpanExporter()
        elif settings.traces == "otlp":
            try:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            except ImportError:
                raise RuntimeError(
                    "GROUNDLOOP_TRACES=otlp needs the exporter: pip install 'groundloop[otlp]'"
                ) from None
            exporter = (
                OTLPSpanExporter(endpoint=otlp_traces_url(settings.otlp_endpoint))
                if settings.otlp_endpoint
                else OTLPSpanExporter()  # OTEL_EXPORTER_OTLP_* or http://localhost:4318
            )
        else:
            return None
    provider = TracerProvider(resource=Resource.create({"service.name": f"groundloop-{service}"}))
    processor = (
        SimpleSpanProcessor(exporter) if settings.traces != "otlp" else BatchSpanProcessor(exporter)
    )
    provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)  # for libraries; OpenTelemetry takes only the first
    _configured["provider"] = provider  # ours: the latest (a test configures one per test)
    return provider


def shutdown_tracing() -> None:
    """Export the spans still batched and stop the configured provider (at process exit)."""
    provider = _configured.pop("provider", None)
    if provider is not None:
        provider.shutdown()


def tracer() -> trace.Tracer:
    provider = _configured.get("provider")
    return (provider or trace.get_tracer_provider()).get_tracer(_TRACER_NAME)


# ---------------------------------------------------------------------------- propagation


def inject(headers: dict[str, str], event: object | None = None) -> dict[str, str]:
    """Add the W3C traceparent of the trace an event being published belongs to: its own
    root when it begins work of its own (`BEGINS_TRACE`; begun here, linked to the current
    span, unless its handler's outputs began it already), else the current span. Without
    `event` the root is found by the headers' Nats-Msg-Id (the event id)."""
    event_id = getattr(event, "event_id", None) or headers.get("Nats-Msg-Id", "")
    ctx = _BEGUN.get(event_id)
    if ctx is None and event is not None:
        name = BEGINS_TRACE.get(getattr(event, "TYPE", ""))
        if name is not None:
            ctx = begin_trace(event, name)
    _PROPAGATOR.inject(headers, context=ctx)
    return headers


@contextmanager
def span_from_headers(
    name: str, headers: dict[str, str] | None, **attributes: Any
) -> Iterator[trace.Span]:
    """Run the body in a span that continues the trace carried by `headers`."""
    parent = _PROPAGATOR.extract(headers or {})
    token = context.attach(parent)
    try:
        with tracer().start_as_current_span(name, attributes=attributes) as span:
            yield span
    finally:
        context.detach(token)


# ---------------------------------------------------------------------------- spans


def event_ids(event: object) -> dict[str, object]:
    """The ids an event names (search, generation, idea, patch, run; a run's purpose), None
    ones left out."""
    values = ((name, getattr(event, name, None)) for name in ID_FIELDS)
    return {name: value for name, value in values if value is not None}


def _attributes(values: Mapping[str, object]) -> dict[str, Any]:
    return {
        f"groundloop.{k}": v if isinstance(v, (str, bool, int, float)) else str(v)
        for k, v in values.items()
        if v is not None
    }


class Handling:
    """One event being handled by a role, inside the consumer's span (see `handling`)."""

    def __init__(self, role: str, span: trace.Span, ids: dict[str, object]):
        self.role, self.span, self.ids = role, span, ids
        self.started_ns = time.time_ns()

    def emitted(self, outputs: Iterable[object]) -> None:
        """The handler returned `outputs`: each that begins its own trace gets its root now
        (spanning the handling), which its publication will carry; the others continue this
        span, which takes the ids they agree on (the patch of a PatchReady…)."""
        continuing: dict[str, set[object]] = {}
        for out in outputs:
            name = BEGINS_TRACE.get(getattr(out, "TYPE", ""))
            if name is not None:
                begin_trace(out, name)
                continue
            for key, value in event_ids(out).items():
                continuing.setdefault(key, set()).add(value)
        agreed = {k: next(iter(v)) for k, v in continuing.items() if len(v) == 1}
        annotate(**{k: v for k, v in agreed.items() if k not in self.ids})


def _current_handling() -> Handling | None:
    handling = context.get_value(_HANDLING)
    return handling if isinstance(handling, Handling) else None


def _known_ids() -> dict[str, object]:
    handling = _current_handling()
    return dict(handling.ids) if handling is not None else {}


@contextmanager
def handling(role: str, event: object) -> Iterator[Handling]:
    """Handle `event` as `role` inside the current (consumer's) span: the span gets the
    event's ids, the role and the event type, and every span opened below carries the ids."""
    ids = event_ids(event)
    span = trace.get_current_span()
    span.set_attributes(
        {
            **_attributes(ids),
            "groundloop.role": role,
            "groundloop.event_type": getattr(event, "TYPE", type(event).__name__),
        }
    )
    current = Handling(role, span, ids)
    token = context.attach(context.set_value(_HANDLING, current))
    try:
        yield current
    finally:
        context.detach(token)


def begin_trace(event: object, name: str) -> context.Context | None:
    """Start `event`'s own trace: a root span `name`, linked to the current span, from when
    the handling that produced it began (or now) until now. Returns the context to publish
    the event with (kept by event id for `inject`), or None when tracing is off."""
    cause = trace.get_current_span().get_span_context()
    handling = _current_handling()
    root = tracer().start_span(
        name,
        context=context.Context(),  # no parent: a new trace
        links=[trace.Link(cause)] if cause.is_valid else None,
        attributes={
            **_attributes(event_ids(event)),
            "groundloop.role": handling.role if handling else getattr(event, "producer", ""),
            "groundloop.event_type": getattr(event, "TYPE", type(event).__name__),
        },
        start_time=handling.started_ns if handling else None,
    )
    root.end()
    event_id = getattr(event, "event_id", None)
    if not root.get_span_context().is_valid:  # tracing is off
        return None
    ctx = trace.set_span_in_context(root, context.Context())
    if event_id is not None:
        _BEGUN[event_id] = ctx
        while len(_BEGUN) > _BEGUN_LIMIT:
            _BEGUN.popitem(last=False)
    return ctx


def annotate(**ids: object) -> None:
    """Ids learnt while handling (a run's id, once its spec is read): set on the current
    span and carried by every span opened below it from now on."""
    values = {k: v for k, v in ids.items() if v is not None}
    handling = _current_handling()
    if handling is not None:
        handling.ids.update(values)  # seen by the steps opened after this
    trace.get_current_span().set_attributes(_attributes(values))


@contextmanager
def step(name: str, **attributes: object) -> Iterator[trace.Span]:
    """A child span of the current one for one step of a handler (materialise, pre-flight…),
    carrying the ids known so far and `attributes`, all as groundloop.<name>."""
    values = {**_known_ids(), **attributes}
    with tracer().start_as_current_span(name, attributes=_attributes(values)) as span:
        yield span


def finished_step(
    name: str, seconds: float, end_ns: int | None = None, **attributes: object
) -> None:
    """A child span of the current one for a step measured elsewhere (a phase of a run, timed
    by the sandbox): `seconds` long, ending at `end_ns` (default now)."""
    end = end_ns if end_ns is not None else time.time_ns()
    values = {**_known_ids(), **attributes}
    span = tracer().start_span(
        name, attributes=_attributes(values), start_time=end - int(max(seconds, 0.0) * 1e9)
    )
    span.end(end_time=end)


def carried(fn: Callable[P, R]) -> Callable[P, R]:
    """`fn` run in the caller's trace context wherever it is called: for thread pools, whose
    threads do not inherit the caller's context (asyncio.to_thread does)."""
    captured = context.get_current()

    @functools.wraps(fn)
    def in_context(*args: P.args, **kwargs: P.kwargs) -> R:
        token = context.attach(captured)
        try:
            return fn(*args, **kwargs)
        finally:
            context.detach(token)

    return in_context


__all__ = [
    "BEGINS_TRACE",
    "Handling",
    "annotate",
    "begin_trace",
    "carried",
    "configure_logging",
    "configure_tracing",
    "event_ids",
    "finished_step",
    "handling",
    "shutdown_tracing",
    "inject",
    "otlp_traces_url",
    "propagate",
    "span_from_headers",
    "step",
    "tracer",
]
