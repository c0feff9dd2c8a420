"""Interoperability: tritonclient's HTTP client against real gunicorn, answers equal to the native API's."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import requests
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from serving.toolchain.data import load_digits_dataset
from tests.conftest import GunicornServer
from tests.v2_support import multi_repo

pytestmark = pytest.mark.slow
HEADER = "Inference-Header-Content-Length"
MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def server(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GunicornServer]:
    repo = multi_repo(model_repo, tmp_path_factory.mktemp("v2-server") / "models")
    with GunicornServer(repo, tmp_path_factory.mktemp("logs"), backend="onnx", models="*", max_batch=64,
                        max_body_bytes=MAX_BODY) as srv:
        yield srv


@pytest.fixture
def client(server: GunicornServer) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}", connection_timeout=10, network_timeout=10)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return load_digits_dataset(seed=0).x_test[:16].astype(np.float32)


def native(server: GunicornServer, data: np.ndarray) -> tuple[np.ndarray, list[str]]:
    probabilities = requests.post(server.url + "/predict", json={"data": data.tolist()}, timeout=10).json()
    labels = requests.post(server.url + "/predict/label", json={"data": data.tolist()}, timeout=10).json()
    return np.asarray(probabilities["prediction"], dtype=np.float32), labels["prediction"]


def test_health_metadata_and_index(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits-tf") and client.is_model_ready("digits-torch", "1")
    assert not client.is_model_ready("nope") and not client.is_model_ready("digits-torch", "3")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    metadata = client.get_model_metadata("digits-torch")
    assert metadata["versions"] == ["1", "2"] and metadata["inputs"][0]["shape"] == [-1, 8, 8]
    assert client.get_model_metadata("digits-torch", "1")["name"] == "digits-torch"
    with pytest.raises(InferenceServerException, match="no model 'nope'"):
        client.get_model_metadata("nope")
    index = client.get_model_repository_index()
    assert {(e["name"], e["version"], e["state"]) for e in index} == {
        ("digits-tf", "1", "READY"), ("digits-torch", "1", "READY"), ("digits-torch", "2", "READY")}


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("model", ["digits-tf", "digits-torch"])
def test_infer_equals_native(server: GunicornServer, client: triton.InferenceServerClient, x: np.ndarray,
                             binary: bool, model: str) -> None:
    infer_input = triton.InferInput("input", [16, 8, 8], "FP32")
    infer_input.set_data_from_numpy(x, binary_data=binary)
    outputs = [triton.InferRequestedOutput("probabilities", binary_data=binary),
               triton.InferRequestedOutput("label", binary_data=binary)]
    result = client.infer(model, [infer_input], outputs=outputs, request_id="interop")
    response = result.get_response()
    assert (response["model_name"], response["id"]) == (model, "interop")
    if model == "digits-tf":  # the native API serves the default model
        probabilities, labels = native(server, x)
        np.testing.assert_array_equal(result.as_numpy("probabilities"), probabilities)
        assert [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("label")] == labels
    versioned = client.infer(model, [infer_input], model_version="1")  # no outputs named: all, binary
    np.testing.assert_array_equal(versioned.as_numpy("probabilities"), result.as_numpy("probabilities"))
    assert versioned.get_response()["model_version"] == "1"


def test_client_errors_surface_as_exceptions(client: triton.InferenceServerClient, x: np.ndarray) -> None:
    wrong = triton.InferInput("input", [16, 8, 8], "FP64")
    wrong.set_data_from_numpy(x.astype(np.float64) * 3)
    with pytest.raises(InferenceServerException, match=r"must lie in \[0, 1\]"):
        client.infer("digits-tf", [wrong])
    text = triton.InferInput("input", [1, 64], "BYTES")
    text.set_data_from_numpy(np.array([[b"x"] * 64], dtype=np.object_))
    with pytest.raises(InferenceServerException, match="datatype BYTES"):
        client.infer("digits-tf", [text])
    with pytest.raises(InferenceServerException, match="no version 5"):
        client.infer("digits-torch", [wrong], model_version="5")


def post(server: GunicornServer, path: str, body: bytes, headers: dict[str, str]) -> requests.Response:
    return requests.post(server.url + path, data=body, headers={"Connection": "close", **headers}, timeout=10)


def test_raw_http_no_content_type_limits_and_metrics(server: GunicornServer, x: np.ndarray) -> None:
    header = orjson.dumps({"inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32",
                                       "parameters": {"binary_data_size": 512}}]})
    body = header + x[:2].tobytes()
    answer = post(server, "/v2/models/digits-torch/infer", body, {HEADER: str(len(header))})
    assert answer.status_code == 200 and answer.request.headers.get("Content-Type") is None
    wrong = post(server, "/v2/models/digits-torch/infer", body, {HEADER: str(len(header) + 3)})
    assert wrong.status_code == 400 and set(wrong.json()) == {"error"}
    big = post(server, "/v2/models/digits-torch/infer", b"0" * (MAX_BODY + 1), {})
    assert big.status_code == 413 and "limit" in big.json()["error"]
    many: dict[str, Any] = {"inputs": [{"name": "input", "shape": [65, 64], "datatype": "FP32",
                                        "data": [0.0] * 65 * 64}]}
    over = post(server, "/v2/models/digits-torch/infer", orjson.dumps(many), {"Content-Type": "application/json"})
    assert over.status_code == 422 and "the limit is 64" in over.json()["error"]
    requests_line = ('serving_requests_total{endpoint="/v2/models/<name>/versions/<version>/infer",method="POST",'
                     'status="200"}')
    batches_line = 'serving_batch_size_count{model="digits-torch:2"}'
    before = metric_values(server, requests_line, batches_line)
    for _ in range(4):
        assert post(server, "/v2/models/digits-torch/versions/2/infer", body, {HEADER: str(len(header))}).ok
    expected = [before[0] + 4, before[1] + 4]
    after = metric_values(server, requests_line, batches_line, until=expected)
    assert [b - a for a, b in zip(before, after, strict=True)] == [4, 4]  # summed over both workers
    info = [line for line in requests.get(server.url + "/metrics", timeout=5).text.splitlines()
            if line.startswith("serving_model_info{") and 'model="digits-torch"' in line and 'version="2"' in line]
    assert len(info) == 2, info  # one per live worker: every worker loaded every served version


def metric_values(server: GunicornServer, *lines: str, until: list[float] | None = None) -> list[float]:
    """The values of the given exposition lines (0 when absent), once they equal ``until`` if given."""

    def values(text: str) -> list[float]:
        found = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
        return [float(found.get(line, 0.0)) for line in lines]

    return values(server.metrics(until=None if until is None else lambda text: values(text) == until))
