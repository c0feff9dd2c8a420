"""``DirectRoutes``: the WSGI entry in front of Flask, answering the inference POSTs itself.

# design: Flask's per-request machinery (request context, URL map, before/after hooks, a Response
# object) costs about 150 us per request on these machines: more than an ONNX model call, and about
# as much as the no-op endpoint the benchmark measures against. The inference POSTs are the hot path,
# so this middleware (``create_app`` installs it as ``app.wsgi_app``) matches them by path and calls
# the very handlers the Flask views call (``predict_answer``, ``infer_answer``). Request ids, body
# limits, error bodies, metrics and the access line come from ``serving.exchange`` on both paths, so
# an answer is the same whichever dispatcher produced it. Everything else, and an inference POST
# without a Content-Length (chunked), goes to Flask. Every request, direct or not, gets its
# ``Exchange`` here and counts as in flight (batched mode) until its answer is built.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

from werkzeug.exceptions import HTTPException
from werkzeug.http import HTTP_STATUS_CODES

from serving.errors import ServingError
from serving.exchange import Answer, Exchange, error_answer, finish, http_error_answer, unexpected_answer
from serving.observability.logging import CURRENT_EXCHANGE, AccessLog
from serving.protocol.native import predict_answer
from serving.protocol.v2.routes import infer_answer
from serving.service import InferenceService

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
Handler = Callable[[Exchange, InferenceService], Answer]
STATUS_LINES = {code: f"{code} {phrase}" for code, phrase in HTTP_STATUS_CODES.items()}  # as Flask writes them
NATIVE_ROUTES: dict[str, tuple[str, Handler]] = {
    "/predict": ("/predict", partial(predict_answer, labels=False)),
    "/predict/label": ("/predict/label", partial(predict_answer, labels=True)),
}
V2_PREFIX = "/v2/models/"


class DirectRoutes:
    """WSGI middleware: inference POSTs are answered here, every other request by the Flask app."""

    def __init__(self, flask_app: WSGIApp, service: InferenceService, access_log: AccessLog) -> None:
        self.flask_app = flask_app
        self.service = service
        self.access_log = access_log
        self.count_in_flight = service.settings.mode == "batched"  # the batcher waits only while others are

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        exchange = Exchange(environ)
        token = CURRENT_EXCHANGE.set(exchange)
        in_flight = self.service.in_flight if self.count_in_flight else None
        if in_flight is not None:
            in_flight.enter()
        try:
            route = _route(exchange)
            if route is None:
                return self.flask_app(environ, start_response)
            endpoint, handler = route
            return self._serve(exchange, endpoint, handler, start_response)
        finally:
            if in_flight is not None:
                in_flight.leave()
            CURRENT_EXCHANGE.reset(token)

    def _serve(self, exchange: Exchange, endpoint: str, handler: Handler,
               start_response: Callable[..., Any]) -> list[bytes]:
        try:
            status, body, content_type, extra = handler(exchange, self.service)
        except ServingError as error:
            status, body, content_type, extra = error_answer(error, exchange)
        except HTTPException as error:  # werkzeug's, e.g. a multipart body shorter than its Content-Length
            status, body, content_type, extra = http_error_answer(error, exchange, self.service.settings.max_body_bytes)
        except Exception:
            status, body, content_type, extra = unexpected_answer(exchange)
        headers = [("Content-Type", content_type), ("Content-Length", str(len(body))),
                   ("X-Request-ID", exchange.request_id)]
        if extra:
            headers.extend(extra.items())
        start_response(STATUS_LINES.get(status) or f"{status} UNKNOWN", headers)
        finish(exchange, endpoint, status, self.service.default_label, self.access_log)
        return [body]


def _route(exchange: Exchange) -> tuple[str, Handler] | None:
    """(metrics endpoint label, handler) for a direct route, or None to let Flask dispatch."""
    environ = exchange.environ
    if environ.get("REQUEST_METHOD") != "POST" or exchange.content_length() is None:
        return None
    path: str = environ.get("PATH_INFO", "")
    native = NATIVE_ROUTES.get(path)
    if native is not None:
        return native
    if not (path.startswith(V2_PREFIX) and path.endswith("/infer") and path.isascii()):
        return None
    parts = path.split("/")  # ["", "v2", "models", name, "infer"] or [..., name, "versions", version, "infer"]
    if len(parts) == 5 and parts[3]:
        return "/v2/models/<name>/infer", partial(infer_answer, name=parts[3], version=None)
    if len(parts) == 7 and parts[3] and parts[4] == "versions" and parts[5]:
        return "/v2/models/<name>/versions/<version>/infer", partial(infer_answer, name=parts[3], version=parts[5])
    return None

