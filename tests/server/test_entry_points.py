"""The classic commands as the tutorials write them: ``python flask_server.py`` serves, and ``application``
is the app under the name the Flask-MNIST tutorial's daemon line uses, on both fronts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import requests

from tests.asgi_support import FRONTS
from tests.conftest import GunicornServer

pytestmark = pytest.mark.slow


def test_python_flask_server_py_serves_on_the_port_it_is_given(model_repo: Path, tmp_path: Path) -> None:
    server = GunicornServer(model_repo, tmp_path, model="digits-torch", backend="onnx", workers=1)
    server.env["SERVING_BIND"] = "127.0.0.1:1"  # the host comes from the setting, the port from --port
    server.command = [sys.executable, "flask_server.py", "--port", str(server.port)]
    with server:
        answer = requests.get(server.url + "/predict/test/label", timeout=10)
        assert answer.status_code == 200 and answer.json()["correct"] is True, answer.text
        assert "Starting gunicorn" in server.log()


@pytest.mark.parametrize("front", list(FRONTS))
def test_application_is_the_app(model_repo: Path, tmp_path: Path, front: str) -> None:
    settings = {**FRONTS[front]}
    settings["app"] = settings.get("app", "flask_server:app").replace(":app", ":application")
    with GunicornServer(model_repo, tmp_path, model="digits-torch", backend="onnx", workers=1, **settings) as server:
        assert requests.get(server.url + "/predict/test/label", timeout=10).json()["correct"] is True
