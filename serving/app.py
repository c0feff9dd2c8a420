"""``create_app()``: the Flask application behind gunicorn.

Registers the blueprints, one error renderer for every failure (``{"error": message}``), request
ids and access logging. Creating the app reads settings and sets up logging only; the model is
loaded in each worker after fork (``gunicorn.conf.py``'s post_worker_init, or the first request).
"""

from __future__ import annotations

import logging
import time

from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from serving.config import Settings
from serving.errors import ServingError
from serving.http import json_response
from serving.observability.logging import configure_logging, sanitize_request_id
from serving.protocol.native import native
from serving.service import InferenceService

log = logging.getLogger("serving")
access_log = logging.getLogger("serving.access")
BLUEPRINTS = [native]
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
    app.after_request(_finish_request if settings.access_log else _tag_response)
    app.register_error_handler(ServingError, _render_serving_error)
    app.register_error_handler(HTTPException, _render_http_error)
    app.register_error_handler(Exception, _render_unexpected)
    return app


def service_of(app: Flask) -> InferenceService:
    """The InferenceService attached to an app built by ``create_app``."""
    service: InferenceService = app.extensions["serving"]
    return service


def _start_request() -> None:
    g.request_id = sanitize_request_id(request.headers.get("X-Request-ID"))
    g.started = time.perf_counter()


def _tag_response(response: Response) -> Response:
    response.headers["X-Request-ID"] = g.get("request_id") or sanitize_request_id(None)
    return response


def _finish_request(response: Response) -> Response:
    _tag_response(response)
    elapsed_ms = (time.perf_counter() - g.get("started", time.perf_counter())) * 1000.0
    access_log.info(
        '"%s %s" %d %.2fms batch=%s', request.method, request.path, response.status_code, elapsed_ms,
        g.get("batch_size", "-"),
        extra={"method": request.method, "path": request.path, "status": response.status_code,
               "latency_ms": round(elapsed_ms, 3), "batch_size": g.get("batch_size")},
    )
    return response


def _render_serving_error(error: ServingError) -> Response:
    if error.status_code >= 500:
        log.error("%s %s -> %d: %s", request.method, request.path, error.status_code, error.message)
    if error.status_code == 413:
        _drain_body()
    return json_response({"error": error.message}, error.status_code, error.headers or None)


def _render_http_error(error: HTTPException) -> Response:
    code = error.code or 500
    if isinstance(error, RequestEntityTooLarge):
        _drain_body()
        message = f"the body is over the limit of {request.max_content_length} bytes"
    elif code == 404:
        message = f"no endpoint at {request.path}"
    elif code == 405:
        message = f"{request.method} is not allowed on {request.path}"
    else:
        message = error.description or error.name
    headers = {"Allow": ", ".join(error.valid_methods)} if code == 405 and getattr(error, "valid_methods", None) else None
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
