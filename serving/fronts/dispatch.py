"""``Dispatcher``: the WSGI entry of every request, in front of Flask.

# design: for every request the dispatcher builds its ``RequestState`` (id, start time, limits) and
# makes it the thread's current request, counts it in flight (batched mode), and then either answers
# it directly or hands it to Flask. Flask's per-request machinery (request context, URL map, hooks,
# a Response object) costs about 150 us on these machines, more than an ONNX model call, so the
# endpoints the table marks ``direct`` (the inference POSTs) are matched by the router's compiled
# matcher and their handlers called here. Everything else, and a body without a Content-Length
# (chunked), goes to Flask. Both paths call the same handlers, render errors with
# ``answer_for_exception`` and end in ``finish`` (metrics and the access line), so an answer is the
# same whichever path produced it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from werkzeug.http import HTTP_STATUS_CODES

from serving.http.answers import answer_for_exception
from serving.http.completion import finish
from serving.http.request import RequestState
from serving.http.routing import Endpoint, Router
from serving.http.security import Gate
from serving.observability.context import CURRENT_REQUEST
from serving.observability.logging import AccessLog
from serving.runtime.service import InferenceService

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
# as Flask writes them
STATUS_LINES = {code: f"{code} {phrase}" for code, phrase in HTTP_STATUS_CODES.items()}
#: The metric label of a request's method: these, or "other" (a label per invented method would grow
#: forever).
NOSNIFF = ("X-Content-Type-Options", "nosniff")


#: The environ keys of the headers every request reads (the rest are computed).
WSGI_KEYS = {
    "Content-Type": "CONTENT_TYPE",
    "Content-Length": "CONTENT_LENGTH",
    "Host": "HTTP_HOST",
    "Authorization": "HTTP_AUTHORIZATION",
    "X-Request-Timeout-Ms": "HTTP_X_REQUEST_TIMEOUT_MS",
    "Transfer-Encoding": "HTTP_TRANSFER_ENCODING",
}


class WsgiRequest(RequestState):
    """A request a WSGI server brought: the transport read from its environ (PEP 3333)."""

    __slots__ = ("environ",)

    def __init__(self, environ: dict[str, Any], endpoints: Sequence[Any] = ()) -> None:
        self.environ = environ
        super().__init__(endpoints, environ.get("HTTP_X_REQUEST_ID"))

    @property
    def method(self) -> str:
        method: str = self.environ.get("REQUEST_METHOD", "-")
        return method

    def header(self, name: str) -> str | None:
        key = WSGI_KEYS.get(name) or "HTTP_" + name.upper().replace("-", "_")
        value: str | None = self.environ.get(key)
        return value

    @property
    def mimetype(self) -> str:  # the hot path: one lookup
        return str(self.environ.get("CONTENT_TYPE", "")).partition(";")[0].strip().lower()

    @property
    def path(self) -> str:
        """WSGI hands the path over as latin-1; decoded as UTF-8 here."""
        path: str = self.environ.get("PATH_INFO", "") or "/"
        return path if path.isascii() else path.encode("latin-1").decode("utf-8", "replace")

    @property
    def query(self) -> str:
        query: str = self.environ.get("QUERY_STRING", "")
        return query

    def content_length(self) -> int | None:
        raw = self.environ.get("CONTENT_LENGTH")
        return int(raw) if raw and raw.isascii() and raw.isdigit() else None

    @property
    def stream(self) -> Any:
        return self.environ["wsgi.input"]

    @property
    def input_terminated(self) -> bool:
        return bool(self.environ.get("wsgi.input_terminated"))


class Dispatcher:
    """WSGI middleware: builds every request's state; answers direct routes, passes the rest to
    Flask."""

    def __init__(
        self,
        flask_app: WSGIApp,
        router: Router,
        gate: Gate,
        service: InferenceService,
        access_log: AccessLog,
    ) -> None:
        self.flask_app = flask_app
        self.router = router
        self.gate = gate
        self.service = service
        self.access_log = access_log
        # the batcher waits only while others are
        self.count_in_flight = service.settings.mode == "batched"

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        request = WsgiRequest(environ, self.router.endpoints)
        token = CURRENT_REQUEST.set(request)
        in_flight = self.service.in_flight if self.count_in_flight else None
        if in_flight is not None:
            in_flight.enter()
        try:
            match = direct_route(self.router, request)
            if match is not None:
                return self._serve(request, *match, start_response)
            return self.flask_app(environ, start_response)
        finally:
            if in_flight is not None:
                in_flight.leave()
            CURRENT_REQUEST.reset(token)

    def _serve(
        self,
        request: RequestState,
        endpoint: Endpoint,
        params: dict[str, str],
        start_response: Callable[..., Any],
    ) -> list[bytes]:
        try:
            self.gate.check(request, endpoint)
            answer = endpoint.handler(request, self.service, **params)
        except Exception as error:
            answer = answer_for_exception(error, request)
        status, body, content_type, extra = answer
        headers = [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("X-Request-ID", request.request_id),
            NOSNIFF,
        ]
        if extra:
            headers.extend(extra.items())
        start_response(STATUS_LINES.get(status) or f"{status} UNKNOWN", headers)
        finish(request, endpoint.metric_label, status, self.access_log)
        return [body]


def direct_route(router: Router, request: WsgiRequest) -> tuple[Endpoint, dict[str, str]] | None:
    """The direct endpoint and path variables for ``request``, or None when Flask must dispatch
    it."""
    method = request.environ.get("REQUEST_METHOD", "")
    if method != "GET" and request.content_length() is None:  # a chunked body goes to Flask
        return None
    return router.match_direct(method, request.environ.get("PATH_INFO", ""))
