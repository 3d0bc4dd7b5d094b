"""Logging and tracing, configured once per process from Settings.

Trace context travels in NATS headers as W3C `traceparent`: the publisher injects the current
span, the consumer loop extracts it and handles the event in a child span, and every event
published while handling carries that span on. So one idea's events (IdeaProposed →
PatchReady → RunStarted → RunCompleted) share one trace. Exporter: none, console, or OTLP.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

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


def configure_tracing(
    settings: Settings, service: str, exporter: SpanExporter | None = None
) -> TracerProvider | None:
    """Install a tracer provider for this process; `exporter` overrides the settings (tests)."""
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
                OTLPSpanExporter(endpoint=settings.otlp_endpoint)
                if settings.otlp_endpoint
                else OTLPSpanExporter()
            )
        else:
            return None
    provider = TracerProvider(resource=Resource.create({"service.name": f"groundloop-{service}"}))
    processor = (
        SimpleSpanProcessor(exporter) if settings.traces != "otlp" else BatchSpanProcessor(exporter)
    )
    provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    return provider


def tracer() -> trace.Tracer:
    return trace.get_tracer(_TRACER_NAME)


def inject(headers: dict[str, str]) -> dict[str, str]:
    """Add the current span's W3C traceparent (if any) to NATS headers."""
    _PROPAGATOR.inject(headers)
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


__all__ = [
    "configure_logging",
    "configure_tracing",
    "inject",
    "span_from_headers",
    "tracer",
    "propagate",
]
