"""``create_app()``: the Flask application behind gunicorn.

Registers the blueprints, one error renderer for every failure (``{"error": message}``), request
ids and access logging, and installs ``DirectRoutes`` in front of Flask for the inference POSTs.
Creating the app reads settings and sets up logging only; the model is loaded in each worker after
fork (``gunicorn.conf.py``'s post_worker_init, or the first request).
"""

from __future__ import annotations

from flask import Flask, Response, current_app, request
from werkzeug.exceptions import HTTPException

from serving.config import Settings
from serving.errors import ServingError
from serving.exchange import current_exchange, error_answer, finish, http_error_answer, unexpected_answer
from serving.http import respond
from serving.observability.logging import AccessLog, configure_logging
from serving.protocol.docs import docs
from serving.protocol.native import native
from serving.protocol.ops import ops
from serving.protocol.v2 import v2
from serving.service import InferenceService
from serving.wsgi import DirectRoutes

BLUEPRINTS = [ops, native, v2, docs]


def create_app(settings: Settings | None = None) -> Flask:
    """Build the WSGI app for ``settings`` (default: from the environment)."""
    settings = settings or Settings.from_env()
    configure_logging(settings)
    app = Flask("serving")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    service = InferenceService(settings)
    access_log = AccessLog(settings)
    app.extensions["serving"] = service
    app.extensions["serving.settings"] = settings
    app.extensions["serving.access_log"] = access_log
    for blueprint in BLUEPRINTS:
        app.register_blueprint(blueprint)
    app.after_request(_finish_request)
    app.register_error_handler(ServingError, _render_serving_error)
    app.register_error_handler(HTTPException, _render_http_error)
    app.register_error_handler(Exception, _render_unexpected)
    app.wsgi_app = DirectRoutes(app.wsgi_app, service, access_log)  # type: ignore[method-assign]
    return app


def service_of(app: Flask) -> InferenceService:
    """The InferenceService attached to an app built by ``create_app``."""
    service: InferenceService = app.extensions["serving"]
    return service


def _finish_request(response: Response) -> Response:
    """Tag the response with its request id, count it, and write the access line."""
    exchange = current_exchange()
    response.headers["X-Request-ID"] = exchange.request_id
    rule = request.url_rule
    extensions = current_app.extensions
    finish(exchange, rule.rule if rule is not None else "unmatched", response.status_code,
           extensions["serving"].default_label, extensions["serving.access_log"])
    return response


def _render_serving_error(error: ServingError) -> Response:
    return respond(error_answer(error, current_exchange()))


def _render_http_error(error: HTTPException) -> Response:
    return respond(http_error_answer(error, current_exchange(), request.max_content_length))


def _render_unexpected(error: Exception) -> Response:
    return respond(unexpected_answer(current_exchange()))
