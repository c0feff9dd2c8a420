"""Property-based hostile input against a real server: never a 5xx, never a dead worker, bounded memory."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import GunicornServer

pytestmark = pytest.mark.slow
ENDPOINTS = ["/predict", "/predict/label", "/predict/test/label", "/metadata", "/label", "/health", "/health/ready",
             "/metrics", "/v2", "/v2/models/digits-torch", "/v2/models/digits-torch/infer",
             "/v2/models/digits-torch/versions/1/infer", "/v2/models/../../etc/passwd/infer", "/openapi.json",
             "/nope"]
CONTENT_TYPES = ["application/json", "text/plain", "image/png", "image/jpeg", "multipart/form-data",
                 "multipart/form-data; boundary=x", "application/octet-stream", "", "application/json; charset=utf-16",
                 "application/x-www-form-urlencoded", "\x00", "a" * 300]
HYPOTHESIS = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=8) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=60,
)
pixel = st.floats(allow_nan=False, allow_infinity=False, width=32) | st.integers(-2**70, 2**70)
hostile_numbers = st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999", b"1" * 5000, b"0x10",
                                   b"1e-999", b"-0", b"9" * 400 + b".5"])


@pytest.fixture(scope="module")
def server(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GunicornServer]:
    srv = GunicornServer(model_repo, tmp_path_factory.mktemp("logs"), model="digits-torch", backend="onnx",
                         mode="threaded", workers=2, threads=4)
    srv.start()
    srv.workers_at_start = {p.pid for p in psutil.Process(srv.pid).children()}  # type: ignore[attr-defined]
    try:
        yield srv
    finally:
        srv.stop()


def dumps(value: Any) -> bytes:
    """Encode with the standard library, which (unlike the server's orjson) writes integers of any size."""
    return json.dumps(value).encode()


def check(answer: requests.Response) -> None:
    assert answer.status_code < 500, (answer.status_code, answer.text[:300])
    assert "Traceback" not in answer.text and "/work/" not in answer.text and "site-packages" not in answer.text
    if answer.status_code >= 400 and answer.headers.get("Content-Type") == "application/json":
        assert "error" in answer.json()


def send(server: GunicornServer, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> None:
    try:
        check(requests.request(method, server.url + path, data=body, headers=headers, timeout=10))
    except requests.exceptions.InvalidHeader:
        pass  # the client library refuses to send it at all


@HYPOTHESIS
@given(payload=json_values, path=st.sampled_from(ENDPOINTS[:2] + ENDPOINTS[10:12]))
def test_random_json(server: GunicornServer, payload: Any, path: str) -> None:
    body = dumps(payload if not isinstance(payload, dict) or len(payload) % 2 else {"data": payload})
    send(server, "POST", path, body, {"Content-Type": "application/json"})


@HYPOTHESIS
@given(data=st.lists(st.lists(pixel, max_size=70), max_size=6) | st.lists(pixel, min_size=60, max_size=70),
       extra=st.sampled_from([None, "id", 3, [], {}]))
def test_arrays_of_wrong_shapes_types_and_magnitudes(server: GunicornServer, data: Any, extra: Any) -> None:
    send(server, "POST", "/predict", dumps({"data": data, "id": extra}), {"Content-Type": "application/json"})


@HYPOTHESIS
@given(number=hostile_numbers, depth=st.integers(0, 3000), path=st.sampled_from(ENDPOINTS[:2]))
def test_hostile_numbers_and_deep_nesting(server: GunicornServer, number: bytes, depth: int, path: str) -> None:
    body = b'{"data": ' + b"[" * depth + number + b"]" * depth + b"}"
    send(server, "POST", path, body, {"Content-Type": "application/json"})


@HYPOTHESIS
@given(body=st.binary(max_size=4096), content_type=st.sampled_from(CONTENT_TYPES),
       path=st.sampled_from(ENDPOINTS), method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
       request_id=st.text(max_size=200), timeout_ms=st.text(max_size=12), header_length=st.text(max_size=12))
def test_random_bytes_and_bogus_headers(server: GunicornServer, body: bytes, content_type: str, path: str,
                                        method: str, request_id: str, timeout_ms: str, header_length: str) -> None:
    headers = {"Content-Type": content_type, "X-Request-ID": request_id, "X-Request-Timeout-Ms": timeout_ms,
               "Inference-Header-Content-Length": header_length}
    raw = {k: v.encode() for k, v in headers.items() if v.isprintable() and v.strip() == v}  # UTF-8 bytes as-is
    send(server, method, path, body, raw)  # type: ignore[arg-type]


@HYPOTHESIS
@given(shape=st.lists(st.integers(-5, 2**40), max_size=6), datatype=st.sampled_from(["FP32", "FP64", "INT64",
       "BYTES", "BOOL", "FP16", "UINT8", "nonsense"]), size=st.integers(-10, 2**40), cut=st.integers(0, 300))
def test_v2_huge_declared_shapes_and_truncated_binary_tensors(server: GunicornServer, shape: list[int],
                                                              datatype: str, size: int, cut: int) -> None:
    header = orjson.dumps({"inputs": [{"name": "input", "shape": shape, "datatype": datatype,
                                       "parameters": {"binary_data_size": size}}]})
    body = header + (b"\0" * 256)[:cut]
    send(server, "POST", "/v2/models/digits-torch/infer", body,
         {"Inference-Header-Content-Length": str(len(header))})
    send(server, "POST", "/v2/models/digits-torch/infer",
         orjson.dumps({"inputs": [{"name": "input", "shape": shape, "datatype": datatype, "data": [0.5] * 64}]}),
         {"Content-Type": "application/json"})


def test_after_the_storm_no_worker_died_and_memory_is_bounded(server: GunicornServer) -> None:
    """Runs last in this module: same workers as at start, still answering, modest memory."""
    workers = psutil.Process(server.pid).children()
    assert {p.pid for p in workers} == server.workers_at_start  # type: ignore[attr-defined]
    assert all(p.memory_info().rss < 600 * 2**20 for p in workers), [p.memory_info().rss for p in workers]
    answer = requests.post(server.url + "/predict/label", data=orjson.dumps({"data": [0.0] * 64}),
                           headers={"Content-Type": "application/json"}, timeout=5)
    assert answer.status_code == 200
    assert "Traceback" not in server.log()
