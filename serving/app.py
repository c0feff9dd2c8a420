"""``create_app()``: the Flask application behind gunicorn.

Generates one Flask URL rule per entry of the endpoint table (each view checks the endpoint's scope
with the same ``Gate`` as the direct routes), renders every failure with the one error renderer
(``{"error": message}``), counts and logs every answer, and installs the ``Dispatcher`` in front of
Flask (request state for every request; the direct routes). Creating the
app reads settings and sets up logging only; the model is loaded in each worker after fork
(``gunicorn.conf.py``'s post_worker_init, or the first request).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from flask import Flask, Response, current_app, request

from serving.answers import Answer, answer_for_exception
from serving.config import Settings
from serving.dispatch import Dispatcher, finish
from serving.endpoints import ENDPOINTS
from serving.observability.logging import AccessLog, configure_logging
from serving.request import current_request
from serving.routing import Endpoint, Router
from serving.security import Gate
from serving.service import InferenceService


def create_app(settings: Settings | None = None, endpoints: Iterable[Endpoint] = ENDPOINTS) -> Flask:
    """Build the WSGI app for ``settings`` (default: from the environment) routing ``endpoints``."""
    settings = settings or Settings.from_env()
    configure_logging(settings)
    app = Flask("serving")
    service = InferenceService(settings)
    access_log = AccessLog(settings)
    router = Router(endpoints)
    gate = Gate(settings)
    app.extensions["serving"] = service
    app.extensions["serving.gate"] = gate
    app.extensions["serving.settings"] = settings
    app.extensions["serving.access_log"] = access_log
    app.extensions["serving.router"] = router
    router.register(app, _view)
    app.after_request(_finish_request)
    app.register_error_handler(Exception, _render_error)  # Flask sends werkzeug's HTTP errors here too
    app.wsgi_app = Dispatcher(app.wsgi_app, router, gate, service, access_log)  # type: ignore[method-assign]
    return app


def service_of(app: Flask) -> InferenceService:
    """The InferenceService attached to an app built by ``create_app``."""
    service: InferenceService = app.extensions["serving"]
    return service


def _respond(answer: Answer) -> Response:
    status, body, content_type, headers = answer
    return Response(body, status=status, headers=headers, content_type=content_type)


def _view(endpoint: Endpoint) -> Callable[..., Response]:
    """The Flask view for one endpoint: its handler with this request's state and the app's service."""

    def view(**params: Any) -> Response:
        state = current_request()
        current_app.extensions["serving.gate"].check(state, endpoint)  # the same check as the direct path
        return _respond(endpoint.handler(state, service_of(current_app), **params))  # type: ignore[arg-type]

    view.__name__ = view.__qualname__ = f"view_{endpoint.handler.__name__}"
    return view


def _finish_request(response: Response) -> Response:
    """Tag the response with its request id, count it, and write the access line."""
    state = current_request()
    response.headers["X-Request-ID"] = state.request_id
    response.headers["X-Content-Type-Options"] = "nosniff"
    extensions = current_app.extensions
    rule = request.url_rule
    endpoint = extensions["serving.router"].by_name(rule.endpoint) if rule is not None else None
    finish(state, endpoint.metric_label if endpoint is not None else "unmatched", response.status_code,
           extensions["serving"].default_label, extensions["serving.access_log"])
    return response


def _render_error(error: Exception) -> Response:
    return _respond(answer_for_exception(error, current_request(), service_of(current_app).body_limit))
