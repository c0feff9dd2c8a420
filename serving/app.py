"""``create_app()``: the Flask application behind gunicorn.

Registers the blueprints, one error renderer for every failure (``{"error": message}``), request
ids and access logging. Creating the app reads settings and sets up logging only; the model is
loaded in each worker after fork (``gunicorn.conf.py``'s post_worker_init, or the first request).
"""

from __future__ import annotations

import logging
import time

from flask import Flask, Response, current_app, g, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from serving.config import Settings
from serving.errors import ServingError
from serving.http import json_response
from serving.observability import metrics
from serving.observability.logging import AccessLog, configure_logging, sanitize_request_id
from serving.protocol.docs import docs
from serving.protocol.native import native
from serving.protocol.ops import ops
from serving.protocol.v2 import v2
from serving.service import InferenceService

log = logging.getLogger("serving")
BLUEPRINTS = [ops, native, v2, docs]
DRAIN_LIMIT = 16 * 1024 * 1024  # read and drop at most this much of a refused body, so the client sees the 413


def create_app(settings: Settings | None = None) -> Flask:
    """Build the WSGI app for ``settings`` (default: from the environment)."""
    settings = settings or Settings.from_env()
    configure_logging(settings)
    app = Flask("serving")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.extensions["serving"] = InferenceService(settings)
    app.extensions["serving.settings"] = settings
    for blueprint in BLUEPRINTS:
        app.register_blueprint(blueprint)
    app.before_request(_start_request)
    app.after_request(_finish_request)
    app.extensions["serving.access_log"] = AccessLog(settings)
    if settings.mode == "batched":  # the batcher waits for more requests only while some are on their way
        service = service_of(app)
        app.before_request(service.in_flight.enter)
        app.teardown_request(lambda _exc: service.in_flight.leave())
    app.register_error_handler(ServingError, _render_serving_error)
    app.register_error_handler(HTTPException, _render_http_error)
    app.register_error_handler(Exception, _render_unexpected)
    return app


def service_of(app: Flask) -> InferenceService:
    """The InferenceService attached to an app built by ``create_app``."""
    service: InferenceService = app.extensions["serving"]
    return service


def _start_request() -> None:
    state = g._get_current_object()
    state.started = time.perf_counter()
    state.request_id = sanitize_request_id(request.headers.get("X-Request-ID"))


def _finish_request(response: Response) -> Response:
    """Tag the response with its request id, count it, and write the access line."""
    state = g._get_current_object()
    req = request._get_current_object()  # type: ignore[attr-defined]
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    request_id = getattr(state, "request_id", None) or sanitize_request_id(None)
    response.headers["X-Request-ID"] = request_id
    elapsed = time.perf_counter() - getattr(state, "started", time.perf_counter())
    endpoint = req.url_rule.rule if req.url_rule is not None else "unmatched"
    status = response.status_code
    metrics.observe_request(endpoint, req.method, status, elapsed)
    model = app.extensions["serving"].meta  # the default model, unless the route named another (v2)
    label = getattr(state, "model", None) or (f"{model.name}:{model.version}" if model is not None else "-")
    app.extensions["serving.access_log"].write(
        request_id, req.method, req.path, status, elapsed * 1000.0, label, getattr(state, "batch_size", None),
    )
    return response


def _render_serving_error(error: ServingError) -> Response:
    if error.reason is not None:
        metrics.REJECTED.labels(error.reason).inc()
    if error.status_code >= 500:
        log.error("%s %s -> %d: %s", request.method, request.path, error.status_code, error.message)
    if error.status_code == 413:
        _drain_body()
    return json_response({"error": error.message}, error.status_code, error.headers or None)


def _render_http_error(error: HTTPException) -> Response:
    code = error.code or 500
    if isinstance(error, RequestEntityTooLarge):
        metrics.REJECTED.labels("invalid").inc()
        _drain_body()
        message = f"the body is over the limit of {request.max_content_length} bytes"
    elif code == 404:
        message = f"no endpoint at {request.path}"
    elif code == 405:
        message = f"{request.method} is not allowed on {request.path}"
    else:
        message = error.description or error.name
    allowed = getattr(error, "valid_methods", None)
    headers = {"Allow": ", ".join(allowed)} if code == 405 and allowed else None
    return json_response({"error": message}, code, headers)


def _render_unexpected(error: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.path)
    return json_response({"error": "internal server error"}, 500)


def _drain_body() -> None:
    """Discard a refused body of bounded size so closing the socket does not reset the connection."""
    length = request.content_length or 0
    if 0 < length <= DRAIN_LIMIT:
        stream = request.environ["wsgi.input"]
        remaining = length
        try:
            while remaining > 0:
                chunk = stream.read(min(remaining, 65536))
                if not chunk:
                    break
                remaining -= len(chunk)
        except (OSError, ValueError):
            pass
