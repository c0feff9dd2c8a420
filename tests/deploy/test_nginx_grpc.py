"""deploy/nginx.conf's gRPC server block, for real: Debian's nginx (grpc_pass over HTTP/2) in front of a real server,
plain and TLS; nginx's own refusals arrive as gRPC statuses."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.conftest import GunicornServer, free_port
from tests.deploy.test_deploy_security import Nginx, make_certificates

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def upstream(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GunicornServer]:
    with GunicornServer(model_repo, tmp_path_factory.mktemp("grpc-upstream"), backend="onnx", workers=2) as server:
        yield server


def test_the_grpc_block_passes_calls_health_and_errors(upstream: GunicornServer) -> None:
    with Nginx(upstream.port, grpc_upstream_port=upstream.grpc_port) as nginx:
        assert nginx.check().returncode == 0, nginx.check().stderr
        client = triton.InferenceServerClient(f"127.0.0.1:{nginx.grpc_port}")
        try:
            tensor = triton.InferInput("input", [2, 8, 8], "FP32")
            tensor.set_data_from_numpy(np.zeros((2, 8, 8), dtype=np.float32))
            assert client.infer("digits-tf", [tensor]).as_numpy("probabilities").shape == (2, 10)
            assert client.get_model_config("digits-tf").config.max_batch_size == 64
        finally:
            client.close()
        with grpc.insecure_channel(f"127.0.0.1:{nginx.grpc_port}") as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.RpcError) as unknown:  # the server's own status passes through
                stub.ModelMetadata(service_pb2.ModelMetadataRequest(name="nope"), timeout=5)
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
            huge = service_pb2.ModelInferRequest(model_name="digits-tf", raw_input_contents=[b"\0" * (3 << 20)])
            with pytest.raises(grpc.RpcError) as too_large:  # refused by nginx before the server sees it
                stub.ModelInfer(huge, timeout=10)
            assert too_large.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_an_upstream_that_is_down_is_unavailable() -> None:
    with Nginx(free_port(), grpc_upstream_port=free_port()) as nginx:
        with grpc.insecure_channel(f"127.0.0.1:{nginx.grpc_port}") as channel, pytest.raises(grpc.RpcError) as down:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ServerLive(service_pb2.ServerLiveRequest(), timeout=5)
        assert down.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "not answering" in down.value.details()


def test_the_grpc_block_with_tls(upstream: GunicornServer, tmp_path: Path) -> None:
    certs = make_certificates(tmp_path / "tls")
    with Nginx(upstream.port, grpc_upstream_port=upstream.grpc_port, tls=certs) as nginx:
        credentials = grpc.ssl_channel_credentials(root_certificates=certs["ca"].read_bytes())
        with grpc.secure_channel(f"localhost:{nginx.grpc_tls_port}", credentials) as channel:
            live = service_pb2_grpc.GRPCInferenceServiceStub(channel).ServerLive(service_pb2.ServerLiveRequest(),
                                                                                  timeout=5)
            assert live.live
