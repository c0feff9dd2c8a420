"""SERVING_LOG_FORMAT=json through real gunicorn: every line of the log is one JSON object."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
import requests

from tests import fakes

pytestmark = pytest.mark.slow


def test_json_format_covers_gunicorn_app_and_access_lines(server_factory: Any, tmp_path: Any) -> None:
    log_file = tmp_path / "server.log"
    server = server_factory(model="digits-torch", backend="tests.fakes:FaultyOnnx", log_format="json",
                            log_file=str(log_file)).start()
    ok = requests.post(server.url + "/predict", json={"data": [0.0] * 64}, headers={"X-Request-ID": "json-ok"},
                       timeout=10)
    failed = requests.post(server.url + "/predict", json={"data": [fakes.RAISE] + [0.0] * 63},
                           headers={"X-Request-ID": "json-fail"}, timeout=10)
    assert ok.status_code == 200 and failed.status_code == 500
    server.stop()

    lines = [line for line in log_file.read_text().splitlines() if line.strip()]
    entries = [orjson.loads(line) for line in lines]  # raises on any line that is not JSON
    assert all({"time", "level", "pid", "request_id", "message"} <= set(entry) for entry in entries)
    messages = [entry["message"] for entry in entries]
    assert any(message.startswith("Starting gunicorn") for message in messages), messages  # the master's lines
    assert any(message.startswith("Booting worker") for message in messages), messages
    access = [entry for entry in entries if entry.get("path") == "/predict"]
    assert {(entry["request_id"], entry["status"]) for entry in access} == {("json-ok", 200), ("json-fail", 500)}
    failure = [entry for entry in entries if entry["message"].startswith("inference failed")]
    assert len(failure) == 1 and failure[0]["request_id"] == "json-fail" and "Traceback" in failure[0]["exception"]


def test_the_access_line_names_the_model_a_request_used_or_none(model_repo: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """/metrics and a request for an unknown model used no model: their lines say model=-, not the default's."""
    from serving.config import Settings
    from serving.fronts.wsgi import create_app, service_of

    app = create_app(Settings.from_env({}, model_repository=model_repo, models="*"))
    try:
        client = app.test_client()
        for path in ("/label", "/metrics", "/v2/models/nope", "/v2/models/digits-torch", "/health"):
            client.get(path)
    finally:
        service_of(app).close()
    lines = [line for line in capsys.readouterr().err.splitlines() if '" ' in line and " model=" in line]
    models = {line.split('"')[1]: line.split(" model=")[1].split()[0] for line in lines}
    assert models == {"GET /label": "digits-tf:1", "GET /metrics": "-", "GET /v2/models/nope": "-",
                      "GET /v2/models/digits-torch": "digits-torch:1", "GET /health": "-"}, lines
