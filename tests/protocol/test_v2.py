"""The v2 protocol through the app: every endpoint and error case, JSON and binary, same answers as native."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import tritonclient.http as triton
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client import REGISTRY

from serving.config import Settings
from serving.fronts.wsgi import create_app, service_of
from serving.observability.metrics import TALLY
from serving.toolchain.data import load_digits_dataset
from tests.protocol.conftest import serve_in_process
from tests.v2_support import multi_repo

HEADER = "Inference-Header-Content-Length"
MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def repo(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return multi_repo(model_repo, tmp_path_factory.mktemp("v2") / "models")


def settings_for(repo: Path, **overrides: Any) -> Settings:
    return Settings.from_env({}, model_repository=repo, backend="onnx", models="*", workers=1, max_batch=8,
                             max_body_bytes=MAX_BODY, access_log=False, **overrides)


def make_app(repo: Path, **overrides: Any) -> Flask:
    return create_app(settings_for(repo, **overrides))


@pytest.fixture(scope="module")
def app(repo: Path) -> Iterator[Flask]:
    yield from serve_in_process(settings_for(repo))


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return load_digits_dataset(seed=0).x_test[:8].astype(np.float32)


def json_request(data: Any, shape: list[int], datatype: str = "FP32", **extra: Any) -> bytes:
    return orjson.dumps({"inputs": [{"name": "input", "shape": shape, "datatype": datatype, "data": data}], **extra})


def binary_request(array: np.ndarray, datatype: str = "FP32", shape: list[int] | None = None,
                   **extra: Any) -> tuple[bytes, dict[str, str]]:
    entry = {"name": "input", "shape": shape or list(array.shape), "datatype": datatype,
             "parameters": {"binary_data_size": array.nbytes}}
    header = orjson.dumps({"inputs": [entry], **extra})
    return header + array.tobytes(), {HEADER: str(len(header))}


def infer_url(model: str = "digits-tf", version: str | None = None) -> str:
    return f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"


def result_of(response: Any) -> triton.InferResult:
    length = response.headers.get(HEADER)
    return triton.InferResult.from_response_body(response.data, header_length=int(length) if length else None)


def test_server_metadata_and_health(repo: Path, client: FlaskClient) -> None:
    fresh = make_app(repo).test_client()  # nothing loaded yet in this process
    assert fresh.get("/v2/health/live").json == {"live": True}
    not_ready = fresh.get("/v2/health/ready")
    assert not_ready.status_code == 503 and not_ready.json["ready"] is False and "error" in not_ready.json
    assert fresh.get("/v2/models/digits-torch/ready").status_code == 503
    assert fresh.get("/v2/models/nope/ready").status_code == 404
    metadata = client.get("/v2").json
    assert metadata["name"] == "serving" and "binary_tensor_data" in metadata["extensions"]
    assert client.get("/v2/models/digits-tf").status_code == 200  # loads every served model
    assert client.get("/v2/health/ready").json == {"ready": True}
    assert client.get("/v2/models/digits-torch/versions/1/ready").json == {
        "name": "digits-torch", "version": "1", "ready": True}
    assert client.get("/v2/models/digits-torch/ready").json["version"] == "2"  # latest by default


def test_model_metadata(client: FlaskClient) -> None:
    document = client.get("/v2/models/digits-torch").json
    assert document == {
        "name": "digits-torch", "versions": ["1", "2"], "platform": "onnxruntime_onnx",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 8, 8]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
                    {"name": "label", "datatype": "BYTES", "shape": [-1]}],
    }
    assert client.get("/v2/models/digits-torch/versions/1").json == document
    for path, fragment in (("/v2/models/nope", "no model 'nope'"), ("/v2/models/digits-tf/versions/2", "no version 2"),
                           ("/v2/models/digits-tf/versions/x1", "whole numbers"),
                           ("/v2/models/digits-tf/versions/1/infer", "GET is not allowed")):
        answer = client.get(path)
        assert answer.status_code in (404, 405) and fragment in answer.json["error"], (path, answer.json)


def test_json_infer_equals_the_native_api(client: FlaskClient, x: np.ndarray) -> None:
    native = client.post("/predict", json={"data": x.tolist()}).json["prediction"]
    native_labels = client.post("/predict/label", json={"data": x.tolist()}).json["prediction"]
    for shape in ([8, 8, 8], [8, 64]):
        answer = client.post(infer_url(), data=json_request(x.reshape(shape).tolist(), shape, id="abc"),
                             content_type="application/json")
        assert answer.status_code == 200 and answer.content_type == "application/json"
        body = answer.json
        assert (body["model_name"], body["model_version"], body["id"]) == ("digits-tf", "1", "abc")
        probabilities, labels = body["outputs"]
        assert probabilities["shape"] == [8, 10] and probabilities["datatype"] == "FP32"
        assert probabilities["data"] == np.asarray(native).ravel().tolist()  # bit for bit, same model call
        assert labels == {"name": "label", "datatype": "BYTES", "shape": [8], "data": native_labels}
    no_id = client.post(infer_url(), data=json_request(x[:1].tolist(), [1, 8, 8]))
    assert no_id.json["id"] == no_id.headers["X-Request-ID"]


def test_binary_infer_with_no_content_type(client: FlaskClient, x: np.ndarray) -> None:
    native = np.asarray(client.post("/predict", json={"data": x.tolist()}).json["prediction"], dtype=np.float32)
    body, headers = binary_request(x, parameters={"binary_data_output": True})
    answer = client.post(infer_url(), data=body, headers=headers)
    assert "CONTENT_TYPE" not in answer.request.environ  # like tritonclient: no Content-Type at all
    assert answer.status_code == 200 and answer.content_type == "application/octet-stream"
    result = result_of(answer)
    np.testing.assert_array_equal(result.as_numpy("probabilities"), native)
    assert [v.decode() for v in result.as_numpy("label")] == [str(i) for i in native.argmax(axis=1)]
    flat, headers = binary_request(x.reshape(8, 64), outputs=[{"name": "label", "parameters": {"binary_data": True}}])
    only_label = client.post(infer_url(), data=flat, headers=headers, content_type="application/octet-stream")
    assert [o["name"] for o in orjson.loads(only_label.data[:int(only_label.headers[HEADER])])["outputs"]] == ["label"]
    json_out, headers = binary_request(x[:2])  # binary request, JSON answer unless asked
    answer = client.post(infer_url(), data=json_out, headers=headers)
    assert answer.content_type == "application/json" and HEADER not in answer.headers
    np.testing.assert_array_equal(np.float32(answer.json["outputs"][0]["data"]), native[:2].ravel())


def test_converted_datatypes_give_the_same_answer(client: FlaskClient, x: np.ndarray) -> None:
    def probabilities(body: bytes, headers: dict[str, str] | None = None) -> list[float]:
        answer = client.post(infer_url("digits-torch", "1"), data=body, headers=headers or {})
        assert answer.status_code == 200, answer.json
        return answer.json["outputs"][0]["data"]

    expected = probabilities(json_request(x[:2].tolist(), [2, 8, 8]))
    assert probabilities(json_request(x[:2].astype(np.float64).tolist(), [2, 8, 8], "FP64")) == expected
    assert probabilities(*binary_request(x[:2].astype(np.float64), "FP64")) == expected
    assert probabilities(*binary_request(x[:2].astype(np.float16), "FP16")) == probabilities(
        json_request(x[:2].astype(np.float16).astype(np.float32).tolist(), [2, 8, 8]))
    ones = (x[:2] > 0.5).astype(np.int32)
    assert probabilities(json_request(ones.tolist(), [2, 64], "INT32")) == probabilities(
        json_request(ones.astype(np.float32).tolist(), [2, 64]))
    pixels = (ones * 255).astype(np.uint8)  # UINT8 tensors are 8-bit pixels: 255 is the top of the input range
    assert probabilities(*binary_request(pixels, "UINT8")) == probabilities(
        json_request(ones.astype(np.float32).tolist(), [2, 64]))
    assert probabilities(json_request(pixels.tolist(), [2, 64], "UINT8")) == probabilities(
        json_request(ones.astype(np.float32).tolist(), [2, 64]))


ROW = [0.5] * 64
ERRORS = [  # (name, url, body, headers, status, message fragment)
    ("shape/data mismatch", infer_url(), json_request(ROW, [2, 64]), {}, 400, "holds 128 values but 'data' has 64"),
    ("shape vs model", infer_url(), json_request(ROW, [1, 4, 16]), {}, 400, "takes [-1, 8, 8]"),
    ("unknown datatype", infer_url(), json_request(ROW, [1, 64], "FLOAT32"), {}, 400, "unknown datatype"),
    ("BYTES", infer_url(), json_request(["a"] * 64, [1, 64], "BYTES"), {}, 400, "input 'input': datatype BYTES"),
    ("BOOL", infer_url(), json_request([True] * 64, [1, 64], "BOOL"), {}, 400, "datatype BOOL is not accepted"),
    ("wrong input name", infer_url(), orjson.dumps({"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32",
                                                                "data": ROW}]}), {}, 400, "unknown input 'x'"),
    ("unknown output", infer_url(), json_request(ROW, [1, 64], outputs=[{"name": "logits"}]), {}, 400,
     "unknown output 'logits'"),
    ("not JSON", infer_url(), b"{", {}, 400, "not valid JSON"),
    ("empty body", infer_url(), b"", {}, 400, "empty"),
    ("out of range", infer_url(), json_request([2.0] * 64, [1, 64]), {}, 422, "must lie in [0, 1]"),
    ("too many samples", infer_url(), json_request([ROW] * 9, [9, 64]), {}, 422, "the limit is 8"),
    ("empty batch", infer_url(), json_request([], [0, 64]), {}, 422, "empty"),
    ("over max body", infer_url(), b" " * (MAX_BODY + 1), {}, 413, "limit"),
    ("form content type", infer_url(), json_request(ROW, [1, 64]),
     {"Content-Type": "application/x-www-form-urlencoded"}, 415, "Content-Type"),
    ("compressed", infer_url(), json_request(ROW, [1, 64]), {"Content-Encoding": "gzip"}, 415, "Content-Encoding"),
    ("unknown model", infer_url("nope"), json_request(ROW, [1, 64]), {}, 404, "no model 'nope'"),
    ("unknown version", infer_url("digits-tf", "9"), json_request(ROW, [1, 64]), {}, 404, "no version 9"),
    ("bad timeout header", infer_url(), json_request(ROW, [1, 64]), {"X-Request-Timeout-Ms": "soon"}, 400,
     "X-Request-Timeout-Ms"),
    ("bad timeout parameter", infer_url(), json_request(ROW, [1, 64], parameters={"timeout": "1s"}), {}, 400,
     "microseconds"),
]
NAN = np.full((1, 64), 0.5, dtype=np.float32)
NAN[0, 3] = np.nan
BINARY_ERRORS = [
    ("wrong header length", *binary_request(np.zeros((1, 64), np.float32)), 400, "not valid JSON", 7),
    ("header length over body", *binary_request(np.zeros((1, 64), np.float32)), 400, HEADER, 10_000),
    ("header length not a number", *binary_request(np.zeros((1, 64), np.float32)), 400, HEADER, "x"),
    ("size vs shape", *binary_request(np.zeros((1, 64), np.float32), shape=[2, 64]), 400, "needs 512", 0),
    ("binary BYTES", *binary_request(np.zeros((1, 64), np.uint8), "BYTES"), 400, "datatype BYTES", 0),
    ("binary BF16", *binary_request(np.zeros((1, 64), np.uint16), "BF16"), 400, "datatype BF16", 0),
    ("binary NaN", *binary_request(NAN), 422, "NaN", 0),
    ("binary too many", *binary_request(np.zeros((9, 8, 8), np.float32)), 422, "the limit is 8", 0),
]


def check_error(answer: Any, status: int, fragment: str) -> None:
    assert answer.status_code == status, answer.data[:300]
    assert set(answer.json) == {"error"} and fragment in answer.json["error"], answer.json
    assert "Traceback" not in answer.json["error"]


@pytest.mark.parametrize(("url", "body", "headers", "status", "fragment"), [e[1:] for e in ERRORS],
                         ids=[e[0] for e in ERRORS])
def test_json_errors(client: FlaskClient, url: str, body: bytes, headers: dict[str, str], status: int,
                     fragment: str) -> None:
    check_error(client.post(url, data=body, headers=headers), status, fragment)


@pytest.mark.parametrize(("body", "headers", "status", "fragment", "header_change"), [e[1:] for e in BINARY_ERRORS],
                         ids=[e[0] for e in BINARY_ERRORS])
def test_binary_errors(client: FlaskClient, body: bytes, headers: dict[str, str], status: int, fragment: str,
                       header_change: int | str) -> None:
    if isinstance(header_change, str):
        headers = {HEADER: header_change}
    elif header_change:
        headers = {HEADER: str(int(headers[HEADER]) + header_change)}
    check_error(client.post(infer_url(), data=body, headers=headers), status, fragment)


def test_repository_index(client: FlaskClient) -> None:
    index = client.get("/v2/repository/index").json
    assert {(e["name"], e["version"]) for e in index} == {("digits-tf", "1"), ("digits-torch", "1"),
                                                          ("digits-torch", "2")}
    assert {e["state"] for e in index} == {"READY"}
    assert client.post("/v2/repository/index").json == index  # tritonclient POSTs an empty body
    assert client.post("/v2/repository/index", json={"ready": True}).json == index
    check_error(client.post("/v2/repository/index", json={"ready": "yes"}), 400, "JSON object")
    check_error(client.post("/v2/repository/index", data=b"{"), 400, "malformed JSON")


def sample(name: str, **labels: str) -> float:
    TALLY.flush()  # what /metrics does first: add this process's pending observations
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_metrics_count_v2_like_native(client: FlaskClient, x: np.ndarray) -> None:
    endpoint = "/v2/models/<name>/versions/<version>/infer"
    before = sample("serving_requests_total", endpoint=endpoint, method="POST", status="200")
    samples_before = sample("serving_batch_size_sum", model="digits-torch:1")
    rejected_before = sample("serving_rejected_requests_total", reason="invalid")
    for _ in range(3):
        assert client.post(infer_url("digits-torch", "1"), data=json_request(x[:4].tolist(), [4, 8, 8])).status_code \
            == 200
    assert client.post(infer_url("digits-torch", "1"), data=b"{").status_code == 400
    assert sample("serving_requests_total", endpoint=endpoint, method="POST", status="200") == before + 3
    assert sample("serving_batch_size_sum", model="digits-torch:1") == samples_before + 12
    assert sample("serving_rejected_requests_total", reason="invalid") == rejected_before + 1


def test_batched_mode_runs_v2_through_the_batcher(repo: Path, x: np.ndarray) -> None:
    app = make_app(repo, mode="batched", max_batch_size=16, max_delay_ms=20)
    service = service_of(app)
    client = app.test_client()
    try:
        expected = client.post(infer_url("digits-torch"), data=json_request(x.tolist(), [8, 8, 8])).json
        batches_before = sample("serving_batch_size_count", model="digits-torch:2")

        def ask(i: int) -> list[float]:
            body, headers = binary_request(x[i:i + 1])
            service.in_flight.enter()  # what the app's before_request does under gunicorn
            try:
                answer = app.test_client().post(infer_url("digits-torch"), data=body, headers=headers)
            finally:
                service.in_flight.leave()
            assert answer.status_code == 200, answer.data
            return answer.json["outputs"][0]["data"]

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, range(8)))
        assert sum(answers, []) == expected["outputs"][0]["data"]
        assert all(b.running for b in service.batchers()) and len(service.batchers()) == 3
        assert sample("serving_batch_size_count", model="digits-torch:2") - batches_before < 8, "batched together"
    finally:
        service.close()
