"""The error matrix through real gunicorn: every bad input gets its 4xx JSON error, no worker dies."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import requests
from PIL import Image

from tests.conftest import GunicornServer

pytestmark = pytest.mark.slow
MAX_BODY = 64 * 1024
JSON = {"Content-Type": "application/json"}
ROW = ",".join(["0.5"] * 64)


@pytest.fixture(scope="module")
def server(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GunicornServer]:
    srv = GunicornServer(model_repo, tmp_path_factory.mktemp("logs"), model="digits-torch", backend="onnx",
                         mode="process", max_batch=4, max_body_bytes=MAX_BODY, max_image_pixels=10_000)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height), 255).save(buffer, format="PNG")
    return buffer.getvalue()


CASES = [
    # (name, method, path, body, headers, status, message fragment)
    ("malformed json", "POST", "/predict", b'{"data": [1, 2', JSON, 400, "malformed JSON"),
    ("empty body", "POST", "/predict", b"", JSON, 400, "empty"),
    ("not an object", "POST", "/predict", b"[1, 2]", JSON, 422, "JSON object"),
    ("no data field", "POST", "/predict", b'{"pixels": []}', JSON, 422, '"data"'),
    ("text/plain", "POST", "/predict", b'{"data": []}', {"Content-Type": "text/plain"}, 415, "Content-Type"),
    ("form", "POST", "/predict/label", b"data=1", {"Content-Type": "application/x-www-form-urlencoded"}, 415,
     "application/json"),
    ("wrong shape", "POST", "/predict", b'{"data": [0.1, 0.2, 0.3]}', JSON, 422, "shape"),
    ("ragged", "POST", "/predict", b'{"data": [[0.1, 0.2], [0.3]]}', JSON, 422, "rectangular"),
    ("strings", "POST", "/predict", b'{"data": ["a", "b"]}', JSON, 422, "numbers"),
    ("nulls", "POST", "/predict", b'{"data": [null, null]}', JSON, 422, "numbers"),
    ("scalar", "POST", "/predict", b'{"data": 3}', JSON, 422, "array"),
    ("out of range", "POST", "/predict", ('{"data": [' + ROW[:-3] + "2.0]}").encode(), JSON, 422, "[0, 1]"),
    ("negative", "POST", "/predict", ('{"data": [' + ROW[:-3] + "-0.1]}").encode(), JSON, 422, "[0, 1]"),
    ("infinite", "POST", "/predict", ('{"data": [' + ROW[:-3] + "1e999]}").encode(), JSON, 400, "infinity"),
    ("empty batch", "POST", "/predict", b'{"data": []}', JSON, 422, "empty"),
    ("batch over limit", "POST", "/predict", ('{"data": [' + ",".join(["[" + ROW + "]"] * 5) + "]}").encode(), JSON,
     422, "limit is 4"),
    ("deeply nested", "POST", "/predict", b'{"data": ' + b"[" * 5000 + b"]" * 5000 + b"}", JSON, 400, "JSON"),
    ("body over limit", "POST", "/predict", b'{"data": [' + b"0.5," * (MAX_BODY // 4) + b"0.5]}", JSON, 413, "limit"),
    ("garbage image", "POST", "/predict", b"\x89PNG not really", {"Content-Type": "image/png"}, 400, "image"),
    ("image too many pixels", "POST", "/predict", png(200, 200), {"Content-Type": "image/png"}, 413, "pixels"),
    ("multipart without file", "POST", "/predict", None, None, 400, "'file'"),
    ("unknown path", "GET", "/nope", None, None, 404, "no endpoint"),
    ("wrong method", "GET", "/predict", None, None, 405, "not allowed"),
    ("wrong method 2", "POST", "/health", b"{}", JSON, 405, "not allowed"),
]


@pytest.mark.parametrize(("name", "method", "path", "body", "headers", "status", "fragment"), CASES,
                         ids=[c[0] for c in CASES])
def test_error_matrix(server: GunicornServer, name: str, method: str, path: str, body: bytes | None,
                      headers: dict[str, str] | None, status: int, fragment: str) -> None:
    if name == "multipart without file":
        answer = requests.post(server.url + path, files={"other": ("x.png", png(8, 8), "image/png")}, timeout=10)
    else:
        answer = requests.request(method, server.url + path, data=body, headers=headers, timeout=10)
    assert answer.status_code == status, answer.text
    assert answer.headers["Content-Type"] == "application/json"
    payload = answer.json()
    assert set(payload) == {"error"} and fragment in payload["error"], payload
    assert "Traceback" not in answer.text and "/serving/" not in answer.text
    assert answer.headers["X-Request-ID"]
    if status == 405:
        assert answer.headers["Allow"]


def test_no_worker_died_and_service_still_answers(server: GunicornServer) -> None:
    """Runs after the matrix (same module-scoped server): the original workers are still there."""
    master = psutil.Process(server.pid)
    workers_before = {p.pid for p in master.children()}
    for _ in range(20):
        requests.post(server.url + "/predict", data=b"{bad", headers=JSON, timeout=5)
    assert {p.pid for p in master.children()} == workers_before
    ok = requests.post(server.url + "/predict/label", data=('{"data": [' + ROW + "]}").encode(), headers=JSON,
                       timeout=5)
    assert ok.status_code == 200
    assert "Traceback" not in server.log(), "bad input must never produce a traceback in the log"
