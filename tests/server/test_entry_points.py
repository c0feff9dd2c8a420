"""The classic commands as the tutorials write them: ``python flask_server.py`` serves, and ``application``
is the app under the name the Flask-MNIST tutorial's daemon line uses, on both fronts."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from serving.tools.testing import clean_env, free_port, stop_group
from tests.asgi_support import FRONTS
from tests.conftest import ROOT, GunicornServer

pytestmark = pytest.mark.slow


def test_python_flask_server_py_serves_on_the_port_it_is_given(model_repo: Path, tmp_path: Path) -> None:
    port = free_port()
    env = clean_env(SERVING_MODEL_REPOSITORY=str(model_repo), SERVING_MODEL="digits-torch", SERVING_BACKEND="onnx",
                    SERVING_WORKERS="1")
    with open(tmp_path / "server.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "flask_server.py", "--port", str(port)], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                if requests.get(f"http://127.0.0.1:{port}/health/ready", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.2)
        answer = requests.get(f"http://127.0.0.1:{port}/predict/test/label", timeout=10)
        assert answer.status_code == 200 and answer.json()["correct"] is True, answer.text
        assert "gunicorn" in (tmp_path / "server.log").read_text()
    finally:
        assert stop_group(proc) == 0


@pytest.mark.parametrize("front", list(FRONTS))
def test_application_is_the_app(model_repo: Path, tmp_path: Path, front: str) -> None:
    settings = {**FRONTS[front]}
    settings["app"] = settings.get("app", "flask_server:app").replace(":app", ":application")
    with GunicornServer(model_repo, tmp_path, model="digits-torch", backend="onnx", workers=1, **settings) as server:
        assert requests.get(server.url + "/predict/test/label", timeout=10).json()["correct"] is True
