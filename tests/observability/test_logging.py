"""SERVING_LOG_FORMAT=json through real gunicorn: every line of the log is one JSON object."""

from __future__ import annotations

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
