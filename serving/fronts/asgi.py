"""``create_asgi_app()``: the ASGI front, over the same endpoint table, handlers, gate, errors,
metrics and logs.

# design: the ASGI app is a transport, like ``serving.fronts.dispatch.Dispatcher`` is for WSGI: per
# request it builds the same ``RequestState`` (an ``AsgiRequest``: the scope's method, path and
# headers, with the body once the loop has read it), routes with ``Router.match`` (the compiled
# endpoint table), checks ``Gate.check``, calls the endpoint's handler in a bounded thread pool
# (``serving.fronts.asgi_pool``), renders failures with ``answer_for_exception`` and ends in
# ``serving.http.completion.finish`` (metrics, access line). In batched mode an inference handler (a
# ``direct`` endpoint) with a body up to ``INLINE_BODY_BYTES`` runs on the event loop instead and
# awaits the batcher there (``serving.fronts.suspend``): no thread waits for a batch, and the
# batcher's bounded queue answers 503 when full. A larger body, whose decoding would hold the loop
# for milliseconds, and any picture (``POOLED``: a 31 KB PNG can take 100 ms to decode) go to the
# pool as in the other modes. Nothing about a protocol is decided
# here. What the event loop does itself is what it is good at: holding many idle or slow
# connections, reading bodies without a thread each (a declared length over the limit is refused
# before a byte is read; a chunked body stops one byte past it), and streaming the lines of a
# ``StreamingHandler`` as they come. Models load after fork in gunicorn's post_worker_init
# (``serving.fronts.parts.parts_of`` finds its parts, as on the Flask app), or in the lifespan
# startup when an ASGI server runs it alone.
"""

from __future__ import annotations

import asyncio
import contextvars
import io
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping, Sequence
from functools import partial
from typing import Any, TypeVar

from serving.config import CLIENT_SILENCE_S, Settings, silence_limit
from serving.errors import BadRequest, ConfigError, MethodNotAllowed, ModelLoadError, NoRoute
from serving.fronts import suspend
from serving.fronts.asgi_pool import RequestPool
from serving.fronts.observed import observe_asgi
from serving.fronts.parts import ServingParts
from serving.http.answers import DRAIN_LIMIT, Answer, answer_for_exception
from serving.http.completion import finish
from serving.http.request import RequestState
from serving.http.routing import Endpoint, Router
from serving.http.security import Gate
from serving.observability.context import CURRENT_REQUEST
from serving.observability.logging import AccessLog, configure_logging
from serving.protocol.endpoints import ENDPOINTS
from serving.protocol.stream import StreamingHandler
from serving.runtime.service import InferenceService

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
log = logging.getLogger("serving")
T = TypeVar("T")
NOSNIFF = (b"x-content-type-options", b"nosniff")
#: Flask's automatic OPTIONS answer (empty, with Allow), which the WSGI app gives on every routed
#: path.
OPTIONS_TYPE = "text/html; charset=utf-8"
#: The largest body an inference handler decodes on the event loop in batched mode (about 0.3 ms of
#: JSON).
INLINE_BODY_BYTES = 64 * 1024
#: Bodies decoded in the pool whatever their size: a 31 KB PNG can decode to 16 MB in 100 ms.
POOLED = ("image/", "multipart/")


def create_asgi_app(
    settings: Settings | None = None, endpoints: Iterable[Endpoint] = ENDPOINTS
) -> AsgiApp:
    """Build the ASGI app for ``settings`` (default: from the environment) routing ``endpoints``."""
    return AsgiApp(settings or Settings.from_env(), endpoints)


class AsgiApp:
    """An ASGI 3 application: HTTP requests and the lifespan protocol (WebSocket connections are
    refused)."""

    def __init__(self, settings: Settings, endpoints: Iterable[Endpoint] = ENDPOINTS) -> None:
        configure_logging(settings)
        self.settings = settings
        self.service = InferenceService(settings)
        self.router = Router(endpoints)
        self.gate = Gate(settings)
        self.access_log = AccessLog(settings)
        longest_s = (settings.max_client_timeout_ms or settings.request_timeout_ms) / 1000.0
        self.pool = RequestPool(
            settings.threads_per_worker, settings.max_queue, longest_s, float(settings.timeout)
        )
        self.batched = settings.mode == "batched"
        #: A client silent this long mid-body gets a 400 (the WSGI workers' bound, serving.config).
        self.silence_s = silence_limit(settings.timeout)
        self.count_in_flight = self.batched  # the batcher waits only while others are in flight
        #: What gunicorn's hooks (serving.host.hooks) find on the app, as on the Flask app.
        self.serving_parts = ServingParts(
            settings, self.service, self.gate, self.router, self.access_log, "asgi"
        )
        # tracing and payload logs wrap the HTTP handler (left as it is when they are off)
        self._http = observe_asgi(self._http, self.serving_parts)  # type: ignore[method-assign]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":
            await self._refuse_websocket(scope, receive, send)

    async def _refuse_websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A WebSocket upgrade gets the JSON 400 the WSGI front gives it (request id, nosniff),
        through the ASGI ``websocket.http.response`` extension; a server without it answers its bare
        403."""
        await receive()  # websocket.connect
        if "websocket.http.response" not in (scope.get("extensions") or {}):
            await send({"type": "websocket.close", "code": 1008})
            return
        request = AsgiRequest(scope, self.router.endpoints, method="GET")
        token = CURRENT_REQUEST.set(request)
        try:
            error = BadRequest("WebSocket connections are not served here: use HTTP")
            status, body, content_type, extra = answer_for_exception(error, request)
            finish(request, "unmatched", status, self.access_log)
            headers = headers_for(request, content_type, len(body), extra)
            await send(
                {"type": "websocket.http.response.start", "status": status, "headers": headers}
            )
            await send({"type": "websocket.http.response.body", "body": body})
        finally:
            CURRENT_REQUEST.reset(token)

    # -- HTTP -----------------------------------------------------------------------------------
    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = AsgiRequest(scope, self.router.endpoints)
        token = CURRENT_REQUEST.set(request)
        try:
            await self._serve(request, receive, send)
        finally:
            CURRENT_REQUEST.reset(token)

    async def _serve(self, request: AsgiRequest, receive: Receive, send: Send) -> None:
        method, path = request.method, request.path
        match = self.router.match(method, path)
        if match is None:
            await self._unrouted(request, method, path, send)
            return
        endpoint, params = match
        handler = endpoint.handler
        run: Callable[[Callable[[], Any]], Awaitable[Any]] = self._inline
        lines: Iterator[bytes] | None = None
        try:
            self.gate.check(request, endpoint)
            body = (
                await read_body(request, receive, self.service.body_limit, self.silence_s)
                if has_body(request)
                else b""
            )
            if body is None:
                return  # the client went away
            request.body_stream = io.BytesIO(body)
            # on the loop: only a small body of numbers; pictures are decoded in the pool, always
            inline = len(body) <= INLINE_BODY_BYTES and not request.mimetype.startswith(POOLED)
            if not (self.batched and endpoint.direct and inline):
                run = self._in_pool(contextvars.copy_context())
            if isinstance(handler, StreamingHandler):
                lines = await run(partial(handler.lines, request, self.service, **params))
                first = await run(partial(next, lines, b""))  # a failure here: a plain answer
            else:
                answer = await run(partial(handler, request, self.service, **params))
        except Exception as error:
            answer = answer_for_exception(error, request)
            lines = None
        if lines is not None:
            assert isinstance(handler, StreamingHandler)
            await self._stream(
                request, endpoint.metric_label, handler.content_type, lines, first, run, send
            )
            return
        await self._answer(request, endpoint.metric_label, answer, send)
        if answer.status == 413:
            await drain(request, receive)

    def _in_pool(self, context: contextvars.Context) -> Callable[[Callable[[], T]], Awaitable[T]]:
        """Runs a call in a pool thread, in the request's context (its id in log records),
        counted in flight."""
        return partial(self.pool.run, context.run, self._counted)

    def _inline(self, call: Callable[[], T]) -> Awaitable[T]:
        """``call()`` on the event loop, counted in flight, awaiting the batcher where it calls
        the model."""
        return suspend.run(self._counted, call)

    def _counted(self, call: Callable[[], T]) -> T:
        in_flight = self.service.in_flight if self.count_in_flight else None
        if in_flight is None:
            return call()
        in_flight.enter()
        try:
            return call()
        finally:
            in_flight.leave()

    async def _answer(self, request: RequestState, label: str, answer: Answer, send: Send) -> None:
        status, body, content_type, extra = answer
        finish(request, label, status, self.access_log)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": headers_for(request, content_type, len(body), extra),
            }
        )
        await send(
            {"type": "http.response.body", "body": b"" if request.method == "HEAD" else body}
        )

    async def _unrouted(self, request: RequestState, method: str, path: str, send: Send) -> None:
        """404, 405 with Allow, or the automatic OPTIONS answer: what Flask answers for the same
        request."""
        allowed = self.router.allowed(path)
        if not allowed:
            answer = answer_for_exception(NoRoute(f"no endpoint at {path}"), request)
            await self._answer(request, "unmatched", answer, send)
            return
        methods = sorted({*allowed, "OPTIONS", *(("HEAD",) if "GET" in allowed else ())})
        if method != "OPTIONS":
            answer = answer_for_exception(
                MethodNotAllowed(f"{method} is not allowed on {path}", methods), request
            )
            await self._answer(request, "unmatched", answer, send)
            return
        match = self.router.match(allowed[0], path)
        assert match is not None
        answer = Answer(200, b"", OPTIONS_TYPE, {"Allow": ", ".join(methods)})
        await self._answer(request, match[0].metric_label, answer, send)

    async def _stream(
        self,
        request: RequestState,
        label: str,
        content_type: str,
        lines: Iterator[bytes],
        first: bytes,
        run: Callable[[Callable[[], bytes]], Awaitable[bytes]],
        send: Send,
    ) -> None:
        """Send each line as the pool computes it; a failure after the first line becomes the
        last line."""
        finish(request, label, 200, self.access_log)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": headers_for(request, content_type, None, None),
            }
        )
        line = first
        while line:
            await send({"type": "http.response.body", "body": line, "more_body": True})
            try:
                line = await run(partial(next, lines, b""))
            except Exception as error:  # the status is sent already
                line = answer_for_exception(error, request).body + b"\n"
                await send({"type": "http.response.body", "body": line, "more_body": True})
                break
        await send({"type": "http.response.body", "body": b""})

    # -- lifespan -------------------------------------------------------------------------------
    async def _lifespan(self, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:  # a no-op under gunicorn, whose post_worker_init loaded the models already
                    await loop.run_in_executor(None, self.service.load)
                except (ModelLoadError, ConfigError) as exc:
                    log.error("cannot load the model: %s", exc)
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await loop.run_in_executor(None, self.close)
                await send({"type": "lifespan.shutdown.complete"})
                return

    def close(self) -> None:
        """Answer everything queued for the model threads, then stop them and the pool."""
        self.service.close()
        self.pool.shutdown()


class AsgiRequest(RequestState):
    """A request the ASGI server brought: the transport read from its scope, and the body once the
    event loop has read it (``body_stream``). Header names are folded to lower case; a name with an
    underscore is dropped, as gunicorn does, so ``X_Request_ID`` cannot pose as ``X-Request-ID``;
    repeated headers are joined with commas."""

    __slots__ = ("scope", "headers", "body_stream", "_method")

    def __init__(
        self, scope: Scope, endpoints: Sequence[Any] = (), method: str | None = None
    ) -> None:
        self.scope = scope
        self.headers: dict[str, str] = {}
        for raw_name, raw_value in scope.get("headers") or ():
            name = raw_name.decode("latin-1").lower()
            if "_" in name:
                continue
            value = raw_value.decode("latin-1")
            self.headers[name] = f"{self.headers[name]},{value}" if name in self.headers else value
        self.body_stream: Any = io.BytesIO()
        self._method = method or scope["method"]
        super().__init__(endpoints, self.headers.get("x-request-id"))

    @property
    def method(self) -> str:
        return self._method

    @property
    def path(self) -> str:
        path: str = self.scope["path"] or "/"
        return path

    @property
    def query(self) -> str:
        query: bytes = self.scope.get("query_string", b"")
        return query.decode("latin-1")

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    @property
    def stream(self) -> Any:
        return self.body_stream

    @property
    def input_terminated(self) -> bool:
        return True  # the whole body was read before the handler runs


def headers_for(
    request: RequestState, content_type: str, length: int | None, extra: dict[str, str] | None
) -> list[tuple[bytes, bytes]]:
    """The answer's headers: the same set the WSGI app sends (no Content-Length on a stream)."""
    headers = [
        (b"content-type", content_type.encode("latin-1")),
        (b"x-request-id", request.request_id.encode("latin-1")),
        NOSNIFF,
    ]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    if extra:
        headers.extend(
            (name.lower().encode("latin-1"), value.encode("latin-1"))
            for name, value in extra.items()
        )
    return headers


def has_body(request: RequestState) -> bool:
    """A request without Content-Length or Transfer-Encoding has no body (RFC 9112 6.3)."""
    return request.header("Transfer-Encoding") is not None or bool(request.content_length())


async def read_body(
    request: RequestState, receive: Receive, limit: int, silence_s: float = CLIENT_SILENCE_S
) -> bytes | None:
    """The body, read on the event loop; None when the client disconnected.

    A declared length over ``limit`` is not read at all (the handler's ``declared_length`` answers
    413 from CONTENT_LENGTH, as on WSGI); a chunked body stops one byte past ``limit`` (its 413
    comes from ``RequestState.body``). A client silent for ``silence_s`` mid-body gets a 400, as on
    WSGI.
    """
    declared = request.content_length()
    if declared is not None and declared > limit:
        return b""
    wanted = declared if declared is not None else limit + 1
    chunks: list[bytes] = []
    size = 0
    while size < wanted:
        try:
            async with asyncio.timeout(silence_s):
                message = await receive()
        except (
            TimeoutError
        ):  # uvicorn has no body timeout: a body that stops arriving is the client's
            got = f"{size} of its {declared} bytes" if declared is not None else f"{size} bytes"
            raise BadRequest(
                f"the body stopped arriving after {got} ({silence_s:g} s silent)"
            ) from None
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        if chunk:
            chunks.append(chunk)
            size += len(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def drain(request: RequestState, receive: Receive) -> None:
    """After a 413 on a declared length: read and drop up to ``DRAIN_LIMIT`` so the client sees
    the answer instead of a reset (what ``serving.http.answers.drain`` does on WSGI), without a
    thread."""
    remaining = request.content_length() or 0
    if not 0 < remaining <= DRAIN_LIMIT:
        return
    try:
        async with asyncio.timeout(5.0):
            while remaining > 0:
                message = await receive()
                if message["type"] == "http.disconnect" or not message.get("more_body", False):
                    return
                remaining -= len(message.get("body", b""))
    except TimeoutError:
        return
