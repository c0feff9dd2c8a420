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
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from serving.config import Settings
from serving.errors import MethodNotAllowed, NoRoute, PayloadTooLarge, ServingError
from serving.fronts.dispatch import Dispatcher
from serving.fronts.observed import observe_wsgi
from serving.fronts.parts import ATTRIBUTE, ServingParts, parts_of
from serving.http.answers import Answer, answer_for_exception
from serving.http.completion import finish
from serving.http.request import RequestState, current_request
from serving.http.routing import Endpoint, Router
from serving.http.security import Gate
from serving.observability.logging import AccessLog, configure_logging
from serving.protocol.endpoints import ENDPOINTS
from serving.runtime.service import InferenceService


def create_app(
    settings: Settings | None = None, endpoints: Iterable[Endpoint] = ENDPOINTS
) -> Flask:
    """Build the WSGI app for ``settings`` (default: from the environment) routing ``endpoints``."""
    settings = settings or Settings.from_env()
    configure_logging(settings)
    app = Flask("serving")
    router = Router(endpoints)
    parts = ServingParts(
        settings, InferenceService(settings), Gate(settings), router, AccessLog(settings), "wsgi"
    )
    setattr(app, ATTRIBUTE, parts)
    router.register(app, _view)
    app.after_request(_finish_request)
    # Flask sends werkzeug's HTTP errors here too
    app.register_error_handler(Exception, _render_error)
    dispatcher = Dispatcher(app.wsgi_app, router, parts.gate, parts.service, parts.access_log)
    # tracing and payload logs wrap the dispatcher (it is returned as it is when they are off)
    app.wsgi_app = observe_wsgi(dispatcher, parts)  # type: ignore[method-assign]
    return app


def _parts(app: Flask) -> ServingParts:
    parts = parts_of(app)
    assert parts is not None, "an app built by create_app"
    return parts


def service_of(app: Flask) -> InferenceService:
    """The InferenceService attached to an app built by ``create_app``."""
    return _parts(app).service


def _respond(answer: Answer) -> Response:
    status, body, content_type, headers = answer
    return Response(body, status=status, headers=headers, content_type=content_type)


def _view(endpoint: Endpoint) -> Callable[..., Response]:
    """The Flask view for one endpoint: its handler with this request's state and the app's
    service."""

    def view(**params: Any) -> Response:
        state = current_request()
        parts = _parts(current_app)
        parts.gate.check(state, endpoint)  # the same check as the direct path
        return _respond(endpoint.handler(state, parts.service, **params))  # type: ignore[arg-type]

    view.__name__ = view.__qualname__ = f"view_{endpoint.handler.__name__}"
    return view


def _finish_request(response: Response) -> Response:
    """Tag the response with its request id, count it, and write the access line."""
    state = current_request()
    response.headers["X-Request-ID"] = state.request_id
    response.headers["X-Content-Type-Options"] = "nosniff"
    parts = _parts(current_app)
    rule = request.url_rule
    endpoint = parts.router.by_name(rule.endpoint) if rule is not None else None
    finish(
        state,
        endpoint.metric_label if endpoint is not None else "unmatched",
        response.status_code,
        parts.access_log,
    )
    return response


def _render_error(error: Exception) -> Response:
    state = current_request()
    if isinstance(error, HTTPException):
        error = _serving_error(error, state, _parts(current_app).service)
    return _respond(answer_for_exception(error, state))


def _serving_error(
    error: HTTPException, state: RequestState, service: InferenceService
) -> ServingError:
    """Flask's own HTTP errors (no rule, wrong method, a 413 while parsing, a body cut short) as
    ours."""
    code = error.code or 500
    if isinstance(error, RequestEntityTooLarge):
        return PayloadTooLarge(f"the body is over the limit of {service.body_limit} bytes")
    if code == 404:
        return NoRoute(f"no endpoint at {state.path}")
    if code == 405:
        return MethodNotAllowed(
            f"{state.method} is not allowed on {state.path}",
            list(getattr(error, "valid_methods", None) or []),
        )
    return ServingError(error.description or error.name, code)
