"""The gRPC front in process: a real grpc server over an app's parts, driven by tritonclient.grpc and plain stubs.

Every RPC, raw and typed contents, FP32 and UINT8, answers equal to REST's, each error class's status code,
keys and scopes, the request id, metrics, health and reflection. The real-server tests (several gunicorn
workers on one port, TLS, signals, both fronts) are in tests/server/test_grpc_server.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import orjson
import pytest
import tritonclient.grpc as triton
from flask import Flask
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import REGISTRY
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from serving.config import Settings
from serving.fronts.grpc.server import GrpcFront
from serving.fronts.parts import parts_of
from serving.fronts.wsgi import create_app, service_of
from serving.observability.metrics import TALLY
from serving.toolchain.data import load_digits_dataset
from tests.v2_support import multi_repo

MAX_BODY = 64 * 1024
ADMIN, INFERENCE = "admin-key-0123456789abcdef", "inference-key-0123456789abc"


def settings_for(repo: Path, **overrides: Any) -> Settings:
    return Settings.from_env({}, model_repository=repo, backend="onnx", models="*", workers=1, max_batch=16,
                             max_body_bytes=MAX_BODY, access_log=False, **overrides)


class Served:
    """An app and the gRPC front over its parts, on a free port."""

    def __init__(self, settings: Settings) -> None:
        self.app: Flask = create_app(settings)
        parts = parts_of(self.app)
        assert parts is not None
        parts.service.load(workers=1)
        self.front = GrpcFront(parts, "127.0.0.1:0")
        self.target = f"127.0.0.1:{self.front.start()}"

    def close(self) -> None:
        self.front.wait()
        service_of(self.app).close()


@pytest.fixture(scope="module")
def repo(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return multi_repo(model_repo, tmp_path_factory.mktemp("grpc") / "models")


@pytest.fixture(scope="module")
def served(repo: Path) -> Iterator[Served]:
    served = Served(settings_for(repo))
    yield served
    served.close()


@pytest.fixture
def client(served: Served) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(served.target)
    yield client
    client.close()


@pytest.fixture
def stub(served: Served) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(served.target) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return load_digits_dataset(seed=0).x_test[:8].astype(np.float32)


def rest_infer(app: Flask, model: str, x: np.ndarray) -> np.ndarray:
    body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    answer = app.test_client().post(f"/v2/models/{model}/infer", json=body)
    assert answer.status_code == 200, answer.get_data(as_text=True)
    return np.asarray(answer.get_json()["outputs"][0]["data"], dtype=np.float32).reshape(len(x), -1)


def status_of(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value.code(), raised.value.details()


def test_health_metadata_config_and_index(client: triton.InferenceServerClient, served: Served) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits-tf") and client.is_model_ready("digits-torch", "2")
    # an unknown model or version is not ready (Triton's answer), not an error
    assert not client.is_model_ready("nope") and not client.is_model_ready("digits-torch", "9")
    assert not client.is_model_ready("digits-torch", "x")
    metadata = client.get_server_metadata(as_json=True)
    assert metadata["name"] == "serving" and {"model_configuration", "statistics"} <= set(metadata["extensions"])
    model = client.get_model_metadata("digits-torch", as_json=True)
    assert model["versions"] == ["1", "2"] and model["inputs"][0]["shape"] == ["-1", "8", "8"]
    rest = served.app.test_client().get("/v2/models/digits-tf/config").get_json()
    config = client.get_model_config("digits-tf", as_json=True)["config"]
    assert config["max_batch_size"] == rest["max_batch_size"] == 16
    assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": ["8", "8"]}]
    assert [o["name"] for o in config["output"]] == [o["name"] for o in rest["output"]] == ["probabilities", "label"]
    assert client.get_model_config("digits-torch", "1", as_json=True)["config"]["version_policy"] == {
        "specific": {"versions": ["1", "2"]}}
    index = client.get_model_repository_index(as_json=True)["models"]
    assert {(e["name"], e["version"], e["state"]) for e in index} == {
        ("digits-tf", "1", "READY"), ("digits-torch", "1", "READY"), ("digits-torch", "2", "READY")}


@pytest.mark.parametrize("datatype", ["FP32", "UINT8"])
def test_infer_raw_equals_rest(client: triton.InferenceServerClient, served: Served, x: np.ndarray,
                               datatype: str) -> None:
    data = x if datatype == "FP32" else np.rint(x * 255).astype(np.uint8)
    tensor = triton.InferInput("input", list(data.shape), datatype)
    tensor.set_data_from_numpy(data)
    result = client.infer("digits-tf", [tensor], request_id="grpc-1")
    expected = rest_infer(served.app, "digits-tf", data.astype(np.float32) / (255 if datatype == "UINT8" else 1))
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, rtol=1e-6, atol=1e-7)
    labels = [value.decode() for value in result.as_numpy("label")]
    assert labels == [str(i) for i in expected.argmax(axis=1)]
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == ("digits-tf", "1", "grpc-1")
    only = client.infer("digits-torch", [tensor], model_version="1",
                        outputs=[triton.InferRequestedOutput("label")]).get_response()
    assert [o.name for o in only.outputs] == ["label"] and only.model_version == "1"


def test_typed_contents_come_back_typed(stub: service_pb2_grpc.GRPCInferenceServiceStub, served: Served,
                                        x: np.ndarray) -> None:
    request = service_pb2.ModelInferRequest(model_name="digits-tf")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[len(x), 64])
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    response = stub.ModelInfer(request)
    assert not response.raw_output_contents
    probabilities, label = response.outputs
    got = np.asarray(probabilities.contents.fp32_contents, dtype=np.float32).reshape(len(x), 10)
    np.testing.assert_allclose(got, rest_infer(served.app, "digits-tf", x), rtol=1e-6, atol=1e-7)
    assert list(label.contents.bytes_contents) == [str(i).encode() for i in got.argmax(axis=1)]
    pixels = service_pb2.ModelInferRequest(model_name="digits-tf")
    pixels.inputs.add(name="input", datatype="UINT8", shape=[1, 8, 8]).contents.uint_contents.extend([0] * 64)
    assert stub.ModelInfer(pixels).outputs[0].shape == [1, 10]


def raw_request(array: np.ndarray, model: str = "digits-tf", datatype: str = "FP32", **fields: Any) -> Any:
    request = service_pb2.ModelInferRequest(model_name=model, **fields)
    request.inputs.add(name="input", datatype=datatype, shape=list(array.shape))
    request.raw_input_contents.append(array.tobytes())
    return request


REFUSALS = ["unknown model", "unknown version", "raw count", "bytes", "unknown datatype", "raw size", "both forms",
            "unknown output", "timeout", "shared memory"]


@pytest.mark.parametrize(("change", "code", "words"), [
    (lambda r: setattr(r, "model_name", "nope"), grpc.StatusCode.NOT_FOUND, "no model 'nope'"),
    (lambda r: setattr(r, "model_version", "7"), grpc.StatusCode.NOT_FOUND, "no version 7"),
    (lambda r: r.raw_input_contents.append(b"x"), grpc.StatusCode.INVALID_ARGUMENT, "2 entries for 1 inputs"),
    (lambda r: setattr(r.inputs[0], "datatype", "BYTES"), grpc.StatusCode.INVALID_ARGUMENT, "datatype BYTES"),
    (lambda r: setattr(r.inputs[0], "datatype", "FP99"), grpc.StatusCode.INVALID_ARGUMENT, "unknown datatype"),
    (lambda r: r.inputs[0].shape.__setitem__(0, 3), grpc.StatusCode.INVALID_ARGUMENT, "needs 768"),
    (lambda r: r.inputs[0].contents.fp32_contents.append(1.0), grpc.StatusCode.INVALID_ARGUMENT, "both contents"),
    (lambda r: r.outputs.add(name="logits"), grpc.StatusCode.INVALID_ARGUMENT, "unknown output 'logits'"),
    (lambda r: r.parameters["timeout"].MergeFrom(service_pb2.InferParameter(int64_param=5)),
     grpc.StatusCode.INVALID_ARGUMENT, "microseconds"),
    (lambda r: r.inputs[0].parameters["shared_memory_region"].MergeFrom(
        service_pb2.InferParameter(string_param="r")), grpc.StatusCode.INVALID_ARGUMENT, "shared memory"),
], ids=REFUSALS)
def test_refusals_carry_the_status_of_their_error_class(stub: service_pb2_grpc.GRPCInferenceServiceStub,
                                                        x: np.ndarray, change: Any, code: grpc.StatusCode,
                                                        words: str) -> None:
    request = raw_request(x[:2])
    change(request)
    got, details = status_of(lambda: stub.ModelInfer(request))
    assert (got, words in details) == (code, True), details


def test_values_and_sizes_the_model_cannot_take(stub: service_pb2_grpc.GRPCInferenceServiceStub,
                                                x: np.ndarray) -> None:
    assert status_of(lambda: stub.ModelInfer(raw_request(x[:2] * 3)))[0] == grpc.StatusCode.INVALID_ARGUMENT
    many = np.zeros((17, 8, 8), dtype=np.float32)
    code, details = status_of(lambda: stub.ModelInfer(raw_request(many)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "the limit is 16" in details
    # beyond the message cap (the HTTP body cap): gRPC's own refusal, before any handler runs
    huge = np.zeros((300, 8, 8), dtype=np.float32)
    assert status_of(lambda: stub.ModelInfer(raw_request(huge)))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_message_that_does_not_parse_and_a_method_not_served(served: Served) -> None:
    with grpc.insecure_channel(served.target) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        code, details = status_of(lambda: infer(b"\xff\xff\xff"))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a valid inference.ModelInferRequest" in details
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = service_pb2.SystemSharedMemoryStatusRequest()
        assert status_of(lambda: stub.SystemSharedMemoryStatus(request))[0] == grpc.StatusCode.UNIMPLEMENTED


def test_request_id_trailer_and_metrics(stub: service_pb2_grpc.GRPCInferenceServiceStub, x: np.ndarray) -> None:
    def count(code: str) -> float:
        TALLY.flush()
        labels = {"method": "/inference.GRPCInferenceService/ModelInfer", "code": code}
        return REGISTRY.get_sample_value("serving_grpc_requests_total", labels) or 0.0

    ok, refused = count("OK"), count("NOT_FOUND")
    _, call = stub.ModelInfer.with_call(raw_request(x[:1]), metadata=(("x-request-id", "trace-me-42"),))
    assert ("x-request-id", "trace-me-42") in call.trailing_metadata()
    with pytest.raises(grpc.RpcError) as raised:
        stub.ModelInfer(raw_request(x[:1], model="nope"))
    assert any(key == "x-request-id" and len(value) == 32 for key, value in raised.value.trailing_metadata())
    assert (count("OK") - ok, count("NOT_FOUND") - refused) == (1, 1)


def test_statistics_follow_the_requests(client: triton.InferenceServerClient, served: Served,
                                        x: np.ndarray) -> None:
    def stats() -> dict[str, Any]:
        return client.get_inference_statistics("digits-torch", "2", as_json=True)["model_stats"][0]

    before = stats()
    tensor = triton.InferInput("input", [4, 8, 8], "FP32")
    tensor.set_data_from_numpy(x[:4])
    for _ in range(3):
        client.infer("digits-torch", [tensor], model_version="2")
    after = stats()
    assert int(after["inference_count"]) - int(before.get("inference_count", 0)) == 12
    assert int(after["execution_count"]) - int(before.get("execution_count", 0)) == 3
    success = after["inference_stats"]["success"]
    assert int(success["count"]) - int(before["inference_stats"].get("success", {}).get("count", 0)) == 3
    assert int(success["ns"]) > 0 and int(after["last_inference"]) > 0
    rest = served.app.test_client().get("/v2/models/digits-torch/versions/2/stats").get_json()["model_stats"][0]
    assert rest["inference_count"] == int(after["inference_count"])
    every = client.get_inference_statistics(as_json=True)["model_stats"]
    assert [(s["name"], s["version"]) for s in every] == [("digits-tf", "1"), ("digits-torch", "1"),
                                                          ("digits-torch", "2")]
    with pytest.raises(InferenceServerException, match="no model 'nope'"):
        client.get_inference_statistics("nope")


def test_health_and_reflection(served: Served) -> None:
    with grpc.insecure_channel(served.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "inference.GRPCInferenceService"):
            assert health.Check(health_pb2.HealthCheckRequest(service=name)).status == \
                health_pb2.HealthCheckResponse.SERVING
        unknown = health_pb2.HealthCheckRequest(service="nope")
        assert status_of(lambda: health.Check(unknown))[0] == grpc.StatusCode.NOT_FOUND
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        listed = next(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {service.name for service in listed.list_services_response.service}
        assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names
        ask = reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService")
        files = next(reflection.ServerReflectionInfo(iter([ask]))).file_descriptor_response.file_descriptor_proto
        assert files and any(b"ModelInfer" in proto for proto in files)


def test_keys_and_scopes(repo: Path, x: np.ndarray) -> None:
    served = Served(settings_for(repo, api_keys=INFERENCE, admin_keys=ADMIN))
    try:
        with grpc.insecure_channel(served.target) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            request = raw_request(x[:1])

            def bearer(key: str) -> tuple[tuple[str, str], ...]:
                return (("authorization", f"Bearer {key}"),)

            code, details = status_of(lambda: stub.ModelInfer(request))
            assert code == grpc.StatusCode.UNAUTHENTICATED and "Authorization: Bearer" in details
            assert status_of(lambda: stub.ModelInfer(request, metadata=bearer("wrong-key-0123456789")))[0] == \
                grpc.StatusCode.UNAUTHENTICATED
            assert stub.ModelInfer(request, metadata=bearer(INFERENCE)).outputs
            assert stub.ModelInfer(request, metadata=bearer(ADMIN)).outputs  # an admin key passes inference too
            index = service_pb2.RepositoryIndexRequest()
            assert status_of(lambda: stub.RepositoryIndex(index, metadata=bearer(INFERENCE)))[0] == \
                grpc.StatusCode.PERMISSION_DENIED
            assert len(stub.RepositoryIndex(index, metadata=bearer(ADMIN)).models) == 3
            assert stub.ServerLive(service_pb2.ServerLiveRequest()).live  # probes stay open
            unload = service_pb2.RepositoryModelUnloadRequest(model_name="digits-torch")
            assert status_of(lambda: stub.RepositoryModelUnload(unload))[0] == grpc.StatusCode.UNAUTHENTICATED
    finally:
        served.close()


def test_the_rest_config_and_stats_documents(served: Served) -> None:
    client = served.app.test_client()
    config = client.get("/v2/models/digits-torch/versions/2/config").get_json()
    assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "format": "FORMAT_NONE", "dims": [8, 8]}]
    assert config["output"][1] == {"name": "label", "data_type": "TYPE_STRING", "dims": [1], "reshape": {"shape": []}}
    assert config["platform"] == "onnxruntime_onnx" and "dynamic_batching" not in config
    for path in ("/v2/models/nope/config", "/v2/models/digits-torch/versions/5/config", "/v2/models/nope/stats"):
        answer = client.get(path)
        assert answer.status_code == 404 and set(orjson.loads(answer.data)) == {"error"}
    stats = client.get("/v2/models/stats").get_json()["model_stats"]
    assert {s["name"] for s in stats} == {"digits-tf", "digits-torch"}
    assert set(stats[0]["inference_stats"]) >= {"success", "fail", "queue", "compute_infer"}
