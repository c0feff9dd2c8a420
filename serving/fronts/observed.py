"""The fronts' observability middleware: a request's trace span and its payload record, by wrapping.

# design: ``observe_wsgi`` and ``observe_asgi`` wrap a front's entry (the WSGI dispatcher, the ASGI
# app's HTTP handler) when tracing or payload logging is on, and hand it back unchanged when both
# are off, so the request path is then exactly what it was. Wrapped, each request gets an
# ``Observation`` (``serving.observability.observed``) that the loaded model's wrapper fills in, a
# SERVER span continuing the client's ``traceparent`` (made current, so the model's spans are its
# children, and written back into the answer's headers), and, on an inference endpoint (a direct
# route of the table), the bytes it read and sent captured up to the record cap. When the answer is
# complete (a WSGI body list returned, or its iterable closed; the last ASGI body message sent) the
# span ends and the exchange is offered to the payload log, which samples it by status.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping
from typing import Any

from serving.fronts.parts import ServingParts
from serving.observability import payload_log
from serving.observability.context import CURRENT_REQUEST
from serving.observability.observed import OBSERVATION, Observation
from serving.observability.payload_record import Exchange

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
Message = MutableMapping[str, Any]
HTTPApp = Callable[..., Awaitable[None]]


class _Request:
    """What the middleware tracks for one request."""

    __slots__ = (
        "observation",
        "span",
        "traced",
        "route",
        "record",
        "status",
        "state",
        "sent",
        "read",
        "sent_bytes",
        "read_bytes",
        "answer_type",
        "headers",
        "method",
        "path",
        "length",
        "cap",
    )

    def __init__(self, method: str, path: str, route: str, record: bool, cap: int) -> None:
        self.observation = Observation(time.time_ns())
        self.span: Any = None
        self.traced = False  # the span is sampled (recording)
        self.method, self.path, self.route, self.record, self.cap = method, path, route, record, cap
        self.status = 500
        self.state: Any = None
        self.sent: list[bytes] = []
        self.read: list[bytes] = []
        self.sent_bytes = self.read_bytes = 0
        self.answer_type = ""
        self.headers: list[tuple[str, str]] = []
        self.length = 0

    def keep_read(self, data: bytes) -> None:
        """Keep a piece of the request's body while under the cap (one piece past it marks the
        record as cut)."""
        if data and self.read_bytes <= self.cap:
            self.read.append(data)
            self.read_bytes += len(data)

    def keep_sent(self, data: bytes) -> None:
        """Keep a piece of the answer's body, the same way."""
        if data and self.sent_bytes <= self.cap:
            self.sent.append(data)
            self.sent_bytes += len(data)


class Observer:
    """The tracer and the payload log of one app, and what both fronts do at a request's ends."""

    def __init__(self, parts: ServingParts) -> None:
        self.router = parts.router
        self.tracing: Any = None
        if parts.settings.tracing:  # the SDK is imported only when tracing is on
            from serving.observability import tracing

            self.tracing = tracing.for_settings(parts.settings)
        self.payloads = payload_log.for_settings(parts.settings)
        self.cap = parts.settings.payload_log_max_bytes

    @property
    def on(self) -> bool:
        return self.tracing is not None or self.payloads is not None

    def begin(self, method: str, path: str, carrier: Any, environ: bool) -> _Request:
        """A request starts: ``carrier`` is its WSGI environ (``environ``) or its headers.

        A span the sampler drops is neither made current nor named after its route, and the model
        call is not timed for it: an unsampled request costs the SDK's sampling decision and the
        ``traceparent`` of its answer, little else."""
        route, record = "", False
        if self.payloads is not None:
            match = self.router.match(method, path)
            route = match[0].path if match is not None else ""
            record = match is not None and match[0].direct
        request = _Request(method, path, route, record, self.cap)
        if self.tracing is not None:
            span = self.tracing.server_span(
                method,
                carrier,
                self.tracing.environ_getter if environ else self.tracing.mapping_getter,
            )
            request.span = span
            if span.is_recording():
                if self.payloads is None:
                    match = self.router.match(method, path)
                    route = request.route = match[0].path if match is not None else ""
                if route:
                    span.update_name(f"{method} {route}")
                span.set_attributes(
                    {"http.request.method": method, "url.path": path, "http.route": route}
                )
                request.traced = True
        request.observation.timed = request.traced or record
        return request

    def answered(self, request: _Request, status: int, content_type: str) -> list[tuple[str, str]]:
        """The status is known (the request's state is current): the headers to add."""
        request.status, request.answer_type = status, content_type
        request.state = CURRENT_REQUEST.get()
        if request.span is None:
            return []
        return self.tracing.answer_headers(request.span)  # sampled or not, the context goes on

    def end(self, request: _Request) -> None:
        if not request.observation.timed:  # an unsampled request that is not recorded either
            if request.span is not None:
                request.span.end()
            return
        observation = request.observation
        state = request.state
        attributes: dict[str, Any] = {}
        if state is not None:
            attributes["serving.request_id"] = state.request_id
            if state.batch_size is not None:
                attributes["serving.batch_size"] = state.batch_size
        if observation.model:
            attributes["serving.model"] = observation.model
        trace_id = ""
        if request.span is not None:
            context = request.span.get_span_context()
            if context.trace_flags.sampled:
                trace_id = f"{context.trace_id:032x}"
            self.tracing.end_request(
                request.span,
                request.status,
                attributes,
                observation.model_start_ns,
                observation.model_end_ns,
            )
        if request.record and self.payloads is not None and state is not None:
            self.payloads.offer(
                Exchange(
                    state.request_id,
                    observation.started_ns / 1e9,
                    request.method,
                    request.path,
                    request.route,
                    request.status,
                    (time.time_ns() - observation.started_ns) / 1e6,
                    observation.model,
                    observation.labels,
                    request.headers,
                    state.mimetype,
                    request.length,
                    _joined(request.read, request.length, self.cap),
                    request.answer_type,
                    _joined(request.sent, -1, self.cap),
                    observation.inputs,
                    observation.outputs,
                    trace_id,
                )
            )


def _joined(parts: list[bytes], length: int, cap: int) -> bytes | None:
    """The captured bytes, or None when they are not the whole body (cut at the cap)."""
    data = b"".join(parts)
    if len(data) > cap or (length >= 0 and len(data) < length):
        return None
    return data


# -- WSGI ------------------------------------------------------------------------------------------
class _TeeInput:
    """``wsgi.input`` that keeps what the handler reads, up to the record cap."""

    def __init__(self, stream: Any, request: _Request) -> None:
        self._stream, self._request = stream, request

    def read(self, *args: Any) -> bytes:
        data: bytes = self._stream.read(*args)
        self._keep(data)
        return data

    def readline(self, *args: Any) -> bytes:
        data: bytes = self._stream.readline(*args)
        self._keep(data)
        return data

    def _keep(self, data: bytes) -> None:
        self._request.keep_read(data)

    def __iter__(self) -> Iterator[bytes]:
        for line in self._stream:
            self._keep(line)
            yield line

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class ObservedWsgi:
    """WSGI middleware around the dispatcher."""

    def __init__(self, app: WSGIApp, observer: Observer) -> None:
        self.app, self.observer = app, observer

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        observer = self.observer
        request = observer.begin(
            environ.get("REQUEST_METHOD", "GET"),
            environ.get("PATH_INFO", "") or "/",
            environ,
            True,
        )
        if request.record:
            request.length = int(environ.get("CONTENT_LENGTH") or 0)
            request.headers = [
                (key[5:].lower().replace("_", "-"), str(value))
                for key, value in environ.items()
                if key.startswith("HTTP_")
            ]
            if not str(environ.get("CONTENT_TYPE", "")).startswith(("image/", "multipart/")):
                environ["wsgi.input"] = _TeeInput(environ["wsgi.input"], request)

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            if not request.observation.timed:  # unsampled, unrecorded: only the context goes on
                if request.span is not None:
                    headers.extend(observer.tracing.answer_headers(request.span))
                return start_response(status, headers, exc_info)
            content_type = next((v for k, v in headers if k.lower() == "content-type"), "")
            headers.extend(observer.answered(request, int(status[:3]), content_type))
            return start_response(status, headers, exc_info)

        timed = request.observation.timed
        observation_token = OBSERVATION.set(request.observation) if timed else None
        span_token = tracing_activate(observer, request)
        try:
            body = self.app(environ, start)
        except BaseException:
            observer.end(request)
            raise
        finally:
            if span_token is not None:
                observer.tracing.deactivate(span_token)
            if observation_token is not None:
                OBSERVATION.reset(observation_token)
        if isinstance(body, list):
            if request.record:
                request.sent = body
            observer.end(request)
            return body
        return _Closing(body, request, observer)


def tracing_activate(observer: Observer, request: _Request) -> object | None:
    """Make a sampled request's span current (its model spans are then its children)."""
    if not request.traced:
        return None
    return observer.tracing.activate(request.span)


class _Closing:
    """A WSGI body iterable whose ``close`` ends the request's observation (PEP 3333)."""

    def __init__(self, body: Iterable[bytes], request: _Request, observer: Observer) -> None:
        self._body, self._request, self._observer = body, request, observer

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._body:
            if self._request.record:
                self._request.keep_sent(chunk)
            yield chunk

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self._observer.end(self._request)


def observe_wsgi(app: WSGIApp, parts: ServingParts) -> WSGIApp:
    """``app`` observed, or ``app`` itself when tracing and payload logs are off."""
    observer = Observer(parts)
    return ObservedWsgi(app, observer) if observer.on else app


# -- ASGI ------------------------------------------------------------------------------------------
def observe_asgi(http: HTTPApp, parts: ServingParts) -> HTTPApp:
    """The ASGI app's HTTP handler observed, or itself when tracing and payload logs are off."""
    observer = Observer(parts)
    if not observer.on:
        return http

    async def observed(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        headers = {
            name.decode("latin-1").lower(): value.decode("latin-1")
            for name, value in scope.get("headers") or ()
        }
        request = observer.begin(scope["method"], scope["path"] or "/", headers, False)
        if request.record:
            request.headers = list(headers.items())
            length = headers.get("content-length", "")
            request.length = int(length) if length.isdigit() else 0

        async def tee() -> Message:
            message: Message = await receive()
            request.keep_read(message.get("body") or b"")
            return message

        async def sending(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                content_type = next(
                    (v.decode("latin-1") for k, v in message["headers"] if k == b"content-type"),
                    "",
                )
                extra = observer.answered(request, message["status"], content_type)
                if extra:
                    message["headers"] = [
                        *message["headers"],
                        *((k.encode("latin-1"), v.encode("latin-1")) for k, v in extra),
                    ]
            elif kind == "http.response.body" and request.record:
                request.keep_sent(message.get("body") or b"")
            await send(message)

        timed = request.observation.timed
        observation_token = OBSERVATION.set(request.observation) if timed else None
        span_token = tracing_activate(observer, request)
        try:
            await http(scope, tee if request.record else receive, sending)
        finally:
            if span_token is not None:
                observer.tracing.deactivate(span_token)
            if observation_token is not None:
                OBSERVATION.reset(observation_token)
            observer.end(request)

    return observed
