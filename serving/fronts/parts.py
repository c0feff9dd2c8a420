"""``ServingParts``: what an app of either front is built from, and the one typed way to find it on
an app.

The gunicorn hooks (``serving.host.hooks``) load the models after fork, drain them on exit and start
model control through ``parts_of(worker's app)``; the Flask views and the ASGI app read the same
value.
"""

from __future__ import annotations

from dataclasses import dataclass

from serving.config import Settings
from serving.http.routing import Router
from serving.http.security import Gate
from serving.observability.logging import AccessLog
from serving.runtime.service import InferenceService

ATTRIBUTE = "serving_parts"


@dataclass(frozen=True)
class ServingParts:
    """The settings, data plane, gate, router and access log of one app, WSGI or ASGI."""

    settings: Settings
    service: InferenceService
    gate: Gate
    router: Router
    access_log: AccessLog
    front: str


def parts_of(app: object) -> ServingParts | None:
    """The parts of an app built by ``create_app`` or ``create_asgi_app``; None for any other
    app."""
    parts = getattr(app, ATTRIBUTE, None)
    return parts if isinstance(parts, ServingParts) else None
