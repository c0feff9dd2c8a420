"""Direct routes vs Flask's routing: the same answers, errors, ids, metrics and log lines either way.

An inference POST with a Content-Length is answered by ``serving.fronts.dispatch.Dispatcher`` itself; the same POST
sent chunked (no Content-Length) goes through Flask's views. Both run the same handlers, so every
observable must match: these tests send each request both ways to one real gunicorn server.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import requests

from serving.toolchain.data import load_digits_dataset
from tests import fakes
from tests.conftest import GunicornServer

HEADER = "Inference-Header-Content-Length"
JSON = {"Content-Type": "application/json"}
MAX_BODY = 64 * 1024
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GunicornServer]:
    with GunicornServer(model_repo, tmp_path_factory.mktemp("wsgi"), model="digits-torch",
                        backend="tests.fakes:FaultyOnnx", max_body_bytes=MAX_BODY, workers=1) as srv:
        yield srv


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return load_digits_dataset().x_test[:3].astype(np.float32)


def both_ways(server: GunicornServer, path: str, body: bytes, headers: dict[str, str]) -> list[requests.Response]:
    """The request sent with a Content-Length (direct route) and chunked (Flask's routing)."""
    direct = requests.post(server.url + path, data=body, headers=headers, timeout=10)
    assert "Content-Length" in direct.request.headers
    chunked = requests.post(server.url + path, data=iter([body[: len(body) // 2], body[len(body) // 2:]]),
                            headers=headers, timeout=10)
    assert chunked.request.headers.get("Transfer-Encoding") == "chunked"
    return [direct, chunked]


def same(answers: list[requests.Response]) -> requests.Response:
    """Assert both answers agree on status, content type and body (ids aside); return one."""
    first, second = answers
    assert first.status_code == second.status_code
    assert first.headers["Content-Type"] == second.headers["Content-Type"]
    assert first.headers.get("Retry-After") == second.headers.get("Retry-After")
    if first.headers["Content-Type"] == "application/json":
        one, two = first.json(), second.json()
        for body in (one, two):
            if isinstance(body, dict):
                body.pop("id", None)
        assert one == two
    else:
        assert first.content == second.content
    return first


@pytest.mark.parametrize("path", ["/predict", "/predict/label"])
def test_native_predictions_match(server: GunicornServer, x: np.ndarray, path: str) -> None:
    body = orjson.dumps({"data": x.reshape(3, -1).tolist()})
    answer = same(both_ways(server, path, body, {"Content-Type": "application/json", "X-Request-ID": "abc-1"}))
    assert answer.status_code == 200 and len(answer.json()["prediction"]) == 3
    assert answer.headers["X-Request-ID"] == "abc-1" and answer.json()["id"] == "abc-1"


def test_v2_binary_and_json_match(server: GunicornServer, x: np.ndarray) -> None:
    header = orjson.dumps({"id": "r1", "inputs": [{"name": "input", "shape": [3, 8, 8], "datatype": "FP32",
                                                   "parameters": {"binary_data_size": x.nbytes}}],
                           "parameters": {"binary_data_output": True}})
    binary = same(both_ways(server, "/v2/models/digits-torch/versions/1/infer", header + x.tobytes(),
                            {HEADER: str(len(header))}))
    assert binary.status_code == 200 and binary.headers["Content-Type"] == "application/octet-stream"
    assert binary.headers[HEADER] and int(binary.headers[HEADER]) < len(binary.content)
    document = orjson.dumps({"inputs": [{"name": "input", "shape": [3, 64], "datatype": "FP32",
                                         "data": x.reshape(-1).tolist()}]})
    plain = same(both_ways(server, "/v2/models/digits-torch/infer", document, {}))
    assert plain.status_code == 200 and plain.json()["model_version"] == "1"


@pytest.mark.parametrize(("path", "body", "headers", "status"), [
    ("/predict", b"{not json", {"Content-Type": "application/json"}, 400),
    ("/predict", b'{"data": [0.5, 0.5]}', {"Content-Type": "application/json"}, 422),
    ("/predict", b'{"data": [' + b"2.0," * 63 + b"2.0]}", {"Content-Type": "application/json"}, 422),
    ("/predict", b"\x89PNG broken", {"Content-Type": "image/png"}, 400),
    ("/predict/label", b"a=1", {"Content-Type": "application/x-www-form-urlencoded"}, 415),
    ("/predict", b'{"data": [' + b"0," * 63 + b"0]}", {**JSON, "X-Request-Timeout-Ms": "0"}, 400),
    ("/predict", b"0" * (MAX_BODY + 1), {"Content-Type": "application/json"}, 413),
    ("/v2/models/nope/infer", b"{}", {}, 404),
    ("/v2/models/digits-torch/versions/x/infer", b"{}", {}, 404),
    ("/v2/models/digits-torch/infer", b'{"inputs": []}', {HEADER: "99"}, 400),
], ids=["malformed", "shape", "range", "image", "media-type", "timeout-header", "too-large", "no-model",
        "bad-version", "header-length"])
def test_errors_match(server: GunicornServer, path: str, body: bytes, headers: dict[str, str], status: int) -> None:
    answers = both_ways(server, path, body, headers)
    if status == 413:  # only a declared length can be named in the message; a chunked body is cut at the limit
        assert [a.status_code for a in answers] == [413, 413] and all("limit is" in a.text or "limit of" in a.text
                                                                        for a in answers)
        answers = [answers[0], answers[0]]
    answer = same(answers)
    assert answer.status_code == status and set(answer.json()) == {"error"}
    assert re.fullmatch(r"[0-9a-f]{32}", answer.headers["X-Request-ID"])


def test_both_ways_are_logged_and_counted_alike(server: GunicornServer, x: np.ndarray) -> None:
    line = 'serving_requests_total{endpoint="/predict/label",method="POST",status="200"}'
    before = counter(server, line)
    body = orjson.dumps({"data": x[:2].tolist()})
    assert all(answer.status_code == 200 for answer in both_ways(server, "/predict/label", body, JSON))
    for request_id, data in (("direct-8", body), ("chunked-8", iter([body]))):
        answer = requests.post(server.url + "/predict/label", data=data, headers={**JSON, "X-Request-ID": request_id},
                               timeout=10)
        assert answer.status_code == 200 and answer.headers["X-Request-ID"] == request_id
    deadline = time.monotonic() + 5
    while counter(server, line) < before + 4 and time.monotonic() < deadline:
        time.sleep(0.1)  # /metrics answers from the one worker, which flushes its own tally first
    assert counter(server, line) == before + 4
    log = server.log()
    for request_id in ("direct-8", "chunked-8"):
        access = [entry for entry in log.splitlines() if f"[{request_id}]" in entry]
        assert len(access) == 1, access
        assert re.search(r'"POST /predict/label" 200 [0-9.]+ms model=digits-torch:1 batch=2$', access[0]), access


def test_a_failing_model_is_a_logged_500_with_the_request_id(server: GunicornServer) -> None:
    body = orjson.dumps({"data": [fakes.RAISE] + [0.0] * 63})
    answer = same(both_ways(server, "/predict", body, {"Content-Type": "application/json"}))
    assert answer.status_code == 500 and "server log" in answer.json()["error"]
    for request_id, data in (("fail-direct", body), ("fail-chunked", iter([body]))):
        failed = requests.post(server.url + "/predict", data=data, headers={**JSON, "X-Request-ID": request_id},
                               timeout=10)
        assert failed.status_code == 500 and "Traceback" not in failed.text
    time.sleep(0.2)
    log = server.log()
    for request_id in ("fail-direct", "fail-chunked"):
        assert re.search(rf"\[ERROR\] \[{request_id}\] inference failed for a batch of 1", log), log[-2000:]


def counter(server: GunicornServer, line: str) -> float:
    text = requests.get(server.url + "/metrics", timeout=5).text
    values: dict[str, Any] = dict(entry.rsplit(" ", 1) for entry in text.splitlines() if entry and entry[0] != "#")
    return float(values.get(line, 0.0))


def test_a_multipart_body_cut_short_is_a_400_not_a_500(server: GunicornServer) -> None:
    boundary = "b0undary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"d.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + b"\x89PNG" * 10
    head = (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Request-ID: cut-short\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body) + 500}\r\n\r\n")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head.encode() + body)
        sock.shutdown(socket.SHUT_WR)  # the promised 500 more bytes never come
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    status_line, _, rest = reply.partition(b"\r\n")
    assert status_line.split()[1] == b"400", reply[:500]
    assert b'{"error":' in rest and b"Traceback" not in reply
    time.sleep(0.2)
    assert "unhandled error" not in server.log()
