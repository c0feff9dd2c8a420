"""The in-process layer's fixtures: apps from ``create_app`` and their Flask test clients."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from flask import Flask
from flask.testing import FlaskClient

from serving.config import Settings
from serving.fronts.wsgi import create_app, service_of


def serve_in_process(settings: Settings) -> Iterator[Flask]:
    """An app for a module-scoped fixture (``yield from``); its model threads are stopped afterwards."""
    app = create_app(settings)
    yield app
    service_of(app).close()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """A test client of the module's ``app`` fixture."""
    return app.test_client()
