"""OpenTelemetry tracing: one server span per request, its stages as children, the W3C context in
and out.

# design: tracing attaches by wrapping and costs nothing when off (``SERVING_TRACING`` false, the
# default): nothing imports this module then, so not even the SDK is loaded. When on, each process
# has one ``Tracing`` (``for_settings``): its tracer provider, sampler, exporter and batch span
# processor come from the standard ``OTEL_*`` variables, which the SDK reads itself
# (``serving.config.otel_environment`` refuses at start the values it would silently replace). The
# pieces that wrap the request path use it:
#
# - the fronts' middleware (``serving.fronts.observed``) starts the request's SERVER span from the
#   ``traceparent``/``tracestate`` it finds in the request (``server_span``: any carrier, a WSGI
#   environ, ASGI headers or gRPC metadata), makes it current, writes the span's own
#   ``traceparent`` into the answer (``answer_headers``), and ends it (``end_request``), adding the
#   ``decode`` and ``encode`` children from the times the model call started and ended;
# - the loaded model's wrappers (``serving.runtime.instruments``) add the ``model`` span around
#   every backend call, and in batched mode the ``TracedBatcher`` adds a ``queue`` span per request
#   and one ``batch`` span per batch (``batch_spans``), a child of its first request with a link to
#   every request it served, each ``queue`` span linking back to it.
#
# A request the sampler drops gets a non-recording span: the wrappers see ``is_recording()`` false
# and add nothing, so 1% sampling costs little more than reading and writing the header.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from serving import __version__
from serving.config import Settings, otel_environment
from serving.observability import observed

log = logging.getLogger("serving")
Span = trace.Span
Context = otel_context.Context
SERVICE_NAME = "serving"


class MappingGetter(Getter[Mapping[str, str]]):
    """Reads a carrier that is a mapping of lower-case header (or gRPC metadata) names."""

    def get(self, carrier: Mapping[str, str], key: str) -> list[str] | None:
        value = carrier.get(key.lower())
        return None if value is None else [value]

    def keys(self, carrier: Mapping[str, str]) -> list[str]:
        return list(carrier)


class EnvironGetter(Getter[Mapping[str, Any]]):
    """Reads a WSGI environ: ``traceparent`` is ``HTTP_TRACEPARENT``."""

    def get(self, carrier: Mapping[str, Any], key: str) -> list[str] | None:
        value = carrier.get("HTTP_" + key.upper().replace("-", "_"))
        return None if value is None else [value]

    def keys(self, carrier: Mapping[str, Any]) -> list[str]:
        return [key[5:].lower().replace("_", "-") for key in carrier if key.startswith("HTTP_")]


MAPPING = MappingGetter()
ENVIRON = EnvironGetter()


def wall_ns(monotonic_s: float) -> int:
    """A ``time.monotonic()`` instant as the epoch nanoseconds spans are stamped with."""
    return time.time_ns() - int((time.monotonic() - monotonic_s) * 1e9)


class Tracing:
    """One process's tracer, configured by ``OTEL_*`` as the SDK reads them."""

    environ_getter = ENVIRON
    mapping_getter = MAPPING

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        otel = otel_environment(environ)
        attributes: dict[str, str] = {"service.version": __version__}
        # the operator's name wins: OTEL_SERVICE_NAME, or service.name in OTEL_RESOURCE_ATTRIBUTES
        named = "OTEL_SERVICE_NAME" in otel or "service.name=" in otel.get(
            "OTEL_RESOURCE_ATTRIBUTES", ""
        )
        if not named:
            attributes["service.name"] = SERVICE_NAME
        self.provider = TracerProvider(resource=Resource.create(attributes))
        exporter = _exporter(otel.get("OTEL_TRACES_EXPORTER", "otlp"))
        self.exporter = exporter
        if exporter is not None:
            self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("serving", __version__)
        self.propagator = propagate.get_global_textmap()
        # user code (a custom backend) that asks OpenTelemetry for a tracer joins these traces
        if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
            trace.set_tracer_provider(self.provider)
        observed.at_exit(self.close)

    # -- the request span --------------------------------------------------------------------------
    def server_span(
        self,
        name: str,
        carrier: Mapping[str, Any],
        getter: Getter[Any] = MAPPING,
        attributes: Mapping[str, Any] | None = None,
    ) -> Span:
        """A started SERVER span continuing the trace the carrier's ``traceparent`` names (a new
        trace without one). The carrier is any mapping of request headers or gRPC metadata: a gRPC
        front passes ``dict(context.invocation_metadata())``."""
        parent = self.propagator.extract(carrier, getter=getter)
        return self.tracer.start_span(
            name, context=parent, kind=SpanKind.SERVER, attributes=attributes
        )

    @staticmethod
    def activate(span: Span) -> object:
        """Make ``span`` current for this thread or task; returns the token ``deactivate`` takes."""
        return otel_context.attach(trace.set_span_in_context(span))

    @staticmethod
    def deactivate(token: object) -> None:
        otel_context.detach(token)  # type: ignore[arg-type]

    @staticmethod
    def answer_headers(span: Span) -> list[tuple[str, str]]:
        """The W3C ``traceparent`` (and ``tracestate``) naming the request's span, for the answer
        (written here rather than by the propagator: a quarter of the cost, whatever
        ``OTEL_PROPAGATORS`` reads)."""
        context = span.get_span_context()
        if not context.is_valid:
            return []
        parent = f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"
        state = context.trace_state
        if state:
            return [("traceparent", parent), ("tracestate", state.to_header())]
        return [("traceparent", parent)]

    def end_request(
        self,
        span: Span,
        status: int,
        attributes: Mapping[str, Any],
        model_start_ns: int,
        model_end_ns: int,
    ) -> None:
        """End the request's span with its status; add ``decode`` (from the span's start to the
        first model call) and ``encode`` (from the last model call's end to now) when the request
        reached the model."""
        end = time.time_ns()
        if span.is_recording():
            span.set_attribute("http.response.status_code", status)
            span.set_attributes(attributes)
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR))
            start = getattr(span, "start_time", None)
            if model_start_ns and start:
                parent = trace.set_span_in_context(span)
                self.tracer.start_span("decode", parent, start_time=start).end(model_start_ns)
                if model_end_ns:
                    self.tracer.start_span("encode", parent, start_time=model_end_ns).end(end)
        span.end(end)

    # -- the model's side --------------------------------------------------------------------------
    @contextmanager
    def model_span(self, label: str, samples: int) -> Iterator[None]:
        """The ``model`` span around one backend call, under the current (request or batch) span;
        nothing when that one is not sampled."""
        if not trace.get_current_span().is_recording():
            yield
            return
        attributes = {"serving.model": label, "serving.batch_size": samples}
        with self.tracer.start_as_current_span("model", attributes=attributes):
            yield

    def batch_spans(
        self, label: str, requests: Iterable[tuple[Context, float]], samples: int
    ) -> Span | None:
        """Start the ``batch`` span of a batch of requests, each given as (its context, the
        monotonic time it was queued); end each request's ``queue`` span now. None when no request
        of the batch is sampled."""
        now = time.time_ns()
        sampled = [
            (span, queued)
            for context, queued in requests
            if (span := trace.get_current_span(context)).is_recording()
        ]
        if not sampled:
            return None
        batch = self.tracer.start_span(
            "batch",
            context=trace.set_span_in_context(sampled[0][0]),
            links=[Link(span.get_span_context()) for span, _ in sampled],
            attributes={
                "serving.model": label,
                "serving.batch.requests": len(sampled),
                "serving.batch_size": samples,
            },
            start_time=now,
        )
        link = [Link(batch.get_span_context())]
        for span, queued in sampled:
            self.tracer.start_span(
                "queue", trace.set_span_in_context(span), links=link, start_time=wall_ns(queued)
            ).end(now)
        return batch

    @staticmethod
    def current() -> Context:
        return otel_context.get_current()

    def close(self) -> None:
        """Export what is buffered (worker exit)."""
        self.provider.shutdown()


def _exporter(name: str) -> SpanExporter | None:
    if name == "none":
        return None
    if name == "console":
        return ConsoleSpanExporter()
    # OTLP over HTTP/protobuf: endpoint, headers, timeout and compression from OTEL_EXPORTER_OTLP_*
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


_lock = threading.Lock()
#: One tracer per process and OTEL_* configuration (tests change it; a server never does).
_instances: dict[tuple[tuple[str, str], ...], Tracing] = {}


def for_settings(settings: Settings, environ: Mapping[str, str] | None = None) -> Tracing | None:
    """This process's ``Tracing``, made on first use; None when tracing is off
    (``SERVING_TRACING`` false, or ``OTEL_SDK_DISABLED=true``)."""
    if not settings.tracing:
        return None
    otel = otel_environment(environ)
    if otel.get("OTEL_SDK_DISABLED") == "true":
        return None
    key = tuple(sorted(otel.items()))
    with _lock:
        found = _instances.get(key)
        if found is None:
            found = _instances[key] = Tracing(environ)
            log.info("tracing: OpenTelemetry spans exported as OTEL_* configures")
        return found


def current_span_ids() -> tuple[str, str] | None:
    """The current span's trace and span ids in hex (for payload records), or None."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"
