"""Triton's perf_analyzer, unchanged, against a real server over HTTP and gRPC (scripts/install-perf-analyzer.sh).

It reads the model configuration first, then the statistics before and after each measurement window (it finds
the model version by their queue count), so it only runs when both extensions answer as Triton's do.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, GunicornServer

pytestmark = pytest.mark.slow
THROUGHPUT = re.compile(r"Concurrency: (\d+), throughput: ([\d.]+) infer/sec")


@pytest.fixture(scope="module")
def perf_analyzer() -> str:
    result = subprocess.run([str(ROOT / "scripts" / "install-perf-analyzer.sh")], capture_output=True, text=True,
                            timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def server(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GunicornServer]:
    with GunicornServer(model_repo, tmp_path_factory.mktemp("perf-analyzer"), backend="onnx") as srv:
        yield srv


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_perf_analyzer_runs_unchanged(perf_analyzer: str, server: GunicornServer, protocol: str) -> None:
    url = f"127.0.0.1:{server.port if protocol == 'http' else server.grpc_port}"
    command = [perf_analyzer, "-m", "digits-tf", "-u", url, "-i", protocol, "--input-data", "zero",
               "--concurrency-range", "1:8:7", "--measurement-interval", "500", "--max-trials", "4",
               "--stability-percentage", "100", "-b", "4"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    rates = {int(concurrency): float(rate) for concurrency, rate in THROUGHPUT.findall(output)}
    assert set(rates) == {1, 8} and min(rates.values()) > 0, output[-3000:]
    # the server's side of the report comes from the statistics extension
    assert re.search(r"Server: \n\s+Inference count: [1-9]\d*", output), output[-3000:]
    statuses = re.findall(r'"(?:POST /v2/models/digits-tf/infer|GRPC /inference\.GRPCInferenceService/ModelInfer)" '
                          r"(\d+)", server.log())
    assert statuses and set(statuses) == {"200"}, "no failed request"
