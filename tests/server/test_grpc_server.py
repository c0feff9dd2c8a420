"""The gRPC front under real gunicorn: every worker on one port, TLS, SIGTERM and SIGHUP, both fronts, overload
and deadlines, the master's checks. The RPCs one by one are tested in process (tests/fronts/test_grpc.py)."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from serving.protocol.v2.proto.rpc_status_pb2 import RetryInfo, Status
from serving.toolchain.data import load_digits_dataset
from tests.conftest import GUNICORN, ROOT, GunicornServer, clean_env, free_port
from tests.deploy.test_deploy_security import make_certificates, start_https
from tests.fakes import SLOW

pytestmark = pytest.mark.slow
ONNX = {"backend": "onnx", "models": "*"}
FAULTY = {"backend": "tests.fakes:FaultyOnnx", "models": "*"}
ACCESS = re.compile(r"\[(\d+)\] \[INFO\] \[[^\]]+\] \"GRPC /inference\.GRPCInferenceService/(\w+)\" (\d+)")


def infer_request(x: np.ndarray, model: str = "digits-tf") -> Any:
    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(np.ascontiguousarray(x, dtype=np.float32).tobytes())
    return request


#: The retry policy docs/api.md recommends: a call that reaches a worker in the instant it stops is CANCELLED by
#: gRPC's graceful shutdown, and inference is idempotent.
RETRY_POLICY = json.dumps({"methodConfig": [{
    "name": [{"service": "inference.GRPCInferenceService"}],
    "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.05s", "maxBackoff": "1s", "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"]}}]})


def own_channel(target: str, credentials: grpc.ChannelCredentials | None = None, retry: bool = False) -> grpc.Channel:
    """A channel with a connection of its own (gRPC shares connections between equal channels otherwise)."""
    options: list[tuple[str, Any]] = [("grpc.use_local_subchannel_pool", 1)]
    if retry:
        options.append(("grpc.service_config", RETRY_POLICY))
    if credentials is not None:
        return grpc.secure_channel(target, credentials, options=options)
    return grpc.insecure_channel(target, options=options)


def grpc_lines(server: GunicornServer) -> list[tuple[int, str, int]]:
    """(worker pid, method, status) of every gRPC access line so far."""
    return [(int(pid), method, int(status)) for pid, method, status in ACCESS.findall(server.log())]


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return load_digits_dataset(seed=0).x_test[:8].astype(np.float32)


@pytest.fixture(scope="module")
def server(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GunicornServer]:
    with GunicornServer(model_repo, tmp_path_factory.mktemp("grpc-logs"), **ONNX) as srv:
        yield srv


def test_every_worker_serves_grpc_on_one_port(server: GunicornServer, x: np.ndarray) -> None:
    """New connections spread over the workers' sockets (SO_REUSEPORT); each answers the same, and /metrics sums
    the calls of both."""
    before = grpc_lines(server)
    answers = []
    for _ in range(24):
        with own_channel(server.grpc_target) as channel:
            response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(infer_request(x))
            answers.append(np.frombuffer(response.raw_output_contents[0], dtype="<f4"))
    assert all(np.array_equal(answer, answers[0]) for answer in answers)
    lines = [line for line in grpc_lines(server)[len(before):] if line[1] == "ModelInfer"]
    assert len(lines) == 24 and {status for _, _, status in lines} == {200}
    assert len({pid for pid, _, _ in lines}) == 2, "both workers answered"
    # the access line names the version a call used, and - for one that used none, as over HTTP
    with own_channel(server.grpc_target) as channel:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ServerLive(service_pb2.ServerLiveRequest())
    call = r'"GRPC /inference\.GRPCInferenceService/{}" 200 [\d.]+ms model={} '
    deadline = time.monotonic() + 5
    while not re.search(call.format("ServerLive", "-"), server.log()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert re.search(call.format("ServerLive", "-"), server.log()), server.log()[-2000:]
    assert re.search(call.format("ModelInfer", r"digits-tf:\d+"), server.log())
    text = server.metrics(until=lambda text: 'code="OK"' in text and sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
        if line.startswith('serving_grpc_requests_total{code="OK",method="/inference.GRPCInferenceService/ModelInfer"')
    ) >= 24)
    assert "serving_grpc_request_latency_seconds_bucket" in text


def test_tritonclient_over_grpc_equals_http(server: GunicornServer, x: np.ndarray) -> None:
    import tritonclient.http as triton_http

    grpc_client = triton.InferenceServerClient(server.grpc_target)
    http_client = triton_http.InferenceServerClient(f"127.0.0.1:{server.port}")
    try:
        for datatype, data in (("FP32", x), ("UINT8", np.rint(x * 255).astype(np.uint8))):
            over_grpc = triton.InferInput("input", list(data.shape), datatype)
            over_grpc.set_data_from_numpy(data)
            over_http = triton_http.InferInput("input", list(data.shape), datatype)
            over_http.set_data_from_numpy(data)
            np.testing.assert_array_equal(grpc_client.infer("digits-torch", [over_grpc]).as_numpy("probabilities"),
                                          http_client.infer("digits-torch", [over_http]).as_numpy("probabilities"))
        assert grpc_client.get_model_config("digits-tf").config.max_batch_size == \
            http_client.get_model_config("digits-tf")["max_batch_size"]
        stats = grpc_client.get_inference_statistics("digits-torch", "1").model_stats[0]
        assert stats.inference_count >= 2 * len(x) and stats.inference_stats.success.count >= 2
    finally:
        grpc_client.close()
        http_client.close()


def test_health_service_and_the_servers_own_checks(server: GunicornServer) -> None:
    with own_channel(server.grpc_target) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_tls_from_the_same_certificate_settings(server_factory: Any, tmp_path: Path, x: np.ndarray) -> None:
    certs = make_certificates(tmp_path / "certs")
    server = server_factory(workers=1, certfile=certs["cert"], keyfile=certs["key"], **ONNX)
    start_https(server, certs["ca"])
    credentials = grpc.ssl_channel_credentials(root_certificates=certs["ca"].read_bytes())
    with own_channel(f"localhost:{server.grpc_port}", credentials) as channel:
        assert service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(infer_request(x), timeout=10).outputs
    with own_channel(f"localhost:{server.grpc_port}") as plain, pytest.raises(grpc.RpcError) as refused:
        service_pb2_grpc.GRPCInferenceServiceStub(plain).ServerLive(service_pb2.ServerLiveRequest(), timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_sigterm_lets_calls_in_flight_finish(server_factory: Any, x: np.ndarray) -> None:
    server = server_factory(workers=1, **FAULTY).start()
    slow = x[:1].copy()
    slow[0, 0, 0] = SLOW
    with own_channel(server.grpc_target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=5)
        in_flight = stub.ModelInfer.future(infer_request(slow), timeout=10)
        time.sleep(0.05)
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        assert in_flight.result().outputs, "the call in flight was answered"
        assert server.proc.wait(20) == 0
    lines = grpc_lines(server)
    assert ("ModelInfer", 200) in [(method, status) for _, method, status in lines]
    assert "Worker was sent SIG" not in server.log(), "the worker exited by itself"


def test_sighup_reload_loses_no_call(server_factory: Any, x: np.ndarray) -> None:
    """Old workers stop taking calls and drain; new ones bind the same port; clients reconnect, and the few calls
    that reached an old worker in the instant it stopped are retried (the policy docs/api.md shows)."""
    server = server_factory(**ONNX).start()
    failures: list[str] = []
    done = threading.Event()
    answered = [0]

    def call_in_a_loop() -> None:
        with own_channel(server.grpc_target, retry=True) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            while not done.is_set():
                try:
                    stub.ModelInfer(infer_request(x[:2]), timeout=10, wait_for_ready=True)
                    answered[0] += 1
                except grpc.RpcError as error:
                    failures.append(f"{error.code()}: {error.details()}")

    callers = [threading.Thread(target=call_in_a_loop) for _ in range(4)]
    for caller in callers:
        caller.start()
    time.sleep(1.0)
    assert server.proc is not None
    server.proc.send_signal(signal.SIGHUP)
    time.sleep(4.0)
    done.set()
    for caller in callers:
        caller.join(30)
    assert not failures, failures[:5]
    assert answered[0] > 50
    assert len({pid for pid, _, _ in grpc_lines(server)}) >= 3, "old and new workers answered"


def test_asgi_batched_overload_answers_unavailable_with_pushback(server_factory: Any, x: np.ndarray) -> None:
    server = server_factory(workers=1, front="asgi", mode="batched", max_queue=1, max_batch_size=1, grpc_threads=8,
                            app="asgi_server:app", **FAULTY).start()
    slow = x[:1].copy()
    slow[0, 0, 0] = SLOW

    def call(_: int) -> tuple[grpc.StatusCode, dict[str, str]]:
        with own_channel(server.grpc_target) as channel:
            try:
                _, info = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer.with_call(
                    infer_request(slow), timeout=20)
                return grpc.StatusCode.OK, dict(info.trailing_metadata())
            except grpc.RpcError as error:
                return error.code(), dict(error.trailing_metadata() or ())

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(call, range(6)))
    codes = [code for code, _ in results]
    assert grpc.StatusCode.OK in codes and grpc.StatusCode.UNAVAILABLE in codes, codes
    refused = [trailers for code, trailers in results if code == grpc.StatusCode.UNAVAILABLE]
    assert all(trailers.get("grpc-retry-pushback-ms") == "1000" for trailers in refused), refused
    for trailers in refused:  # gRPC's rich error model too: google.rpc.Status with RetryInfo
        status = Status.FromString(trailers["grpc-status-details-bin"])
        retry = RetryInfo()
        assert status.code == grpc.StatusCode.UNAVAILABLE.value[0] and status.details[0].Unpack(retry)
        assert retry.retry_delay.seconds == 1 and "queue" in status.message


def test_the_deadline_is_the_calls_own_clamped_by_the_server(server_factory: Any, x: np.ndarray) -> None:
    server = server_factory(workers=1, mode="batched", max_client_timeout_ms=100, **FAULTY).start()
    slow = x[:1].copy()
    slow[0, 0, 0] = SLOW  # the model takes 200 ms
    with own_channel(server.grpc_target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as late:
            stub.ModelInfer(infer_request(slow), timeout=20)  # asks for 20 s, gets 100 ms
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "no answer within the request deadline of 100 ms" in late.value.details()  # the server's answer
        assert time.monotonic() - started < 1
        time.sleep(0.3)
        assert stub.ModelInfer(infer_request(x[:1]), timeout=5).outputs


def test_off_and_a_taken_port(model_repo: Path, server_factory: Any, tmp_path: Path) -> None:
    server = server_factory(workers=1, grpc_bind="off", **ONNX).start()
    with own_channel(server.grpc_target) as channel, pytest.raises(grpc.RpcError):
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ServerLive(service_pb2.ServerLiveRequest(), timeout=1)
    assert "gRPC: off" in server.log()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = clean_env(SERVING_MODEL_REPOSITORY=str(model_repo), SERVING_BIND=f"127.0.0.1:{free_port()}",
                        SERVING_GRPC_BIND=f"127.0.0.1:{port}", SERVING_BACKEND="onnx")
        result = subprocess.run([GUNICORN, "-c", "gunicorn.conf.py", "flask_server:app"], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode != 0
    assert f"the gRPC address 127.0.0.1:{port} cannot be bound" in result.stderr and "Traceback" not in result.stderr


def test_repository_load_and_unload_over_grpc(server_factory: Any, repo_copy: Path, x: np.ndarray) -> None:
    """The repository extension's RPCs act on every worker, like their REST twins (SERVING_MODEL_CONTROL=explicit)."""
    server = server_factory(repo_copy, model="digits-torch", backend="onnx", model_control="explicit").start()
    client = triton.InferenceServerClient(server.grpc_target)
    try:
        assert not client.is_model_ready("digits-tf")
        client.load_model("digits-tf")
        index = {(m.name, m.version): m.state for m in client.get_model_repository_index().models}
        assert index[("digits-tf", "1")] == "READY" and client.is_model_ready("digits-tf")
        tensor = triton.InferInput("input", [2, 8, 8], "FP32")
        tensor.set_data_from_numpy(x[:2])
        assert client.infer("digits-tf", [tensor]).as_numpy("probabilities").shape == (2, 10)
        client.unload_model("digits-tf")
        assert not client.is_model_ready("digits-tf")
        with pytest.raises(triton.InferenceServerException) as gone:
            client.infer("digits-tf", [tensor])
        assert gone.value.status() == "StatusCode.NOT_FOUND"
        with pytest.raises(triton.InferenceServerException) as refused:
            client.unload_model("digits-torch")  # the native API's model stays
        assert refused.value.status() == "StatusCode.INVALID_ARGUMENT" and "native API" in refused.value.message()
    finally:
        client.close()
