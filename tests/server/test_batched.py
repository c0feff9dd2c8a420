"""Batched mode through real gunicorn: correct answers under concurrency, overload, metrics, reload."""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import requests

from serving.backends import backend_class
from serving.store.repository import ModelRepository
from serving.toolchain.data import load_digits_dataset
from serving.tools.testing import metric_total
from tests import fakes
from tests.asgi_support import FRONTS
from tests.conftest import GunicornServer

pytestmark = pytest.mark.slow
JSON = {"Content-Type": "application/json"}
CONFIGS = [("digits-tf", "tensorflow", "wsgi"), ("digits-torch", "pytorch", "wsgi"), ("digits-torch", "onnx", "wsgi"),
           ("digits-torch", "pytorch", "asgi")]


@pytest.fixture(scope="module")
def digits() -> Any:
    return load_digits_dataset(seed=0)


def post(url: str, data: Any, headers: dict[str, str] | None = None, timeout: float = 10) -> requests.Response:
    """One request on its own connection (so a worker closing idle keep-alive sockets cannot interfere)."""
    return requests.post(url, data=orjson.dumps({"data": data}), timeout=timeout,
                         headers={**JSON, "Connection": "close", **(headers or {})})


@pytest.fixture(scope="module", params=CONFIGS, ids=["-".join(c) for c in CONFIGS])
def batched(request: pytest.FixtureRequest, model_repo: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[tuple[GunicornServer, Any]]:
    model, backend, front = request.param
    srv = GunicornServer(model_repo, tmp_path_factory.mktemp("logs"), model=model, backend=backend, mode="batched",
                         threads=16, max_batch_size=16, max_delay_ms=10, **FRONTS[front])
    srv.start()
    direct = backend_class(backend)(ModelRepository(model_repo).resolve(model), math_threads=1)
    direct.load()
    try:
        yield srv, direct
    finally:
        srv.stop()


def test_concurrent_clients_get_exactly_their_own_answers(batched: tuple[GunicornServer, Any], digits: Any) -> None:
    srv, direct = batched
    x = digits.x_test[:96]
    expected = direct.predict(x)

    def ask(i: int) -> np.ndarray:
        data = x[i].tolist() if i % 3 else x[i:i + 2].tolist()  # some requests carry two samples
        answer = post(srv.url + "/predict", data)
        assert answer.status_code == 200, answer.text
        return np.asarray(answer.json()["prediction"], dtype=np.float32)

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(ask, range(95)))
    for i, got in enumerate(results):
        want = expected[i:i + 1] if i % 3 else expected[i:i + 2]
        np.testing.assert_allclose(got, want, atol=1e-5)
    metrics = srv.metrics(until=lambda text: metric_total(text, "serving_batch_size_sum") >= 95 + 32)
    total_samples = metric_total(metrics, "serving_batch_size_sum")
    total_batches = metric_total(metrics, "serving_batch_size_count")
    assert total_samples >= 95 + 32 and total_batches < total_samples, "requests were batched together"
    meta = requests.get(srv.url + "/metadata", timeout=5).json()
    assert meta["mode"] == "batched" and meta["batching"]["max_batch_size"] == 16


def test_readiness_and_liveness(batched: tuple[GunicornServer, Any]) -> None:
    srv, _ = batched
    assert requests.get(srv.url + "/health/live", timeout=5).status_code == 200
    ready = requests.get(srv.url + "/health/ready", timeout=5)
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert requests.get(srv.url + "/health", timeout=5).json()["model_loaded"] is True


def flood_server(server_factory: Any, front: str, **settings: Any) -> GunicornServer:
    return server_factory(model="digits-torch", backend="tests.fakes:FaultyOnnx", mode="batched", workers=1,
                          threads=32, max_batch_size=1, max_delay_ms=0, **settings, **FRONTS[front]).start()


@pytest.mark.parametrize("front", FRONTS)
def test_flood_beyond_max_queue_gives_only_200_and_fast_503(server_factory: Any, front: str) -> None:
    server = flood_server(server_factory, front, max_queue=4)
    slow = [fakes.SLOW] + [0.0] * 63  # each model call takes 200 ms: the queue fills at once

    def ask(_: int) -> tuple[int, float, str]:
        started = time.monotonic()
        answer = post(server.url + "/predict", slow, timeout=30)
        return answer.status_code, time.monotonic() - started, answer.headers.get("Retry-After", "")

    with ThreadPoolExecutor(30) as pool:
        results = list(pool.map(ask, range(30)))
    statuses = Counter(status for status, _, _ in results)
    assert set(statuses) == {200, 503}, statuses
    assert statuses[200] >= 5 and statuses[503] >= 10, statuses
    rejected = [elapsed for status, elapsed, _ in results if status == 503]
    assert max(rejected) < 1.0, f"503s must be fast, the slowest took {max(rejected):.2f}s"
    assert all(retry for status, _, retry in results if status == 503)
    metrics = requests.get(server.url + "/metrics", timeout=5).text
    assert f'serving_rejected_requests_total{{reason="queue_full"}} {float(statuses[503])}' in metrics


@pytest.mark.parametrize("front", FRONTS)
def test_deadline_header_gives_504_in_time(server_factory: Any, front: str) -> None:
    server = flood_server(server_factory, front, max_queue=8)
    slow = [fakes.SLOW] + [0.0] * 63
    with ThreadPoolExecutor(2) as pool:
        blocker = pool.submit(post, server.url + "/predict", slow)
        time.sleep(0.05)
        started = time.monotonic()
        late = post(server.url + "/predict", [0.0] * 64, headers={"X-Request-Timeout-Ms": "50"})
        waited = time.monotonic() - started
        assert blocker.result().status_code == 200
    assert late.status_code == 504 and "deadline" in late.json()["error"]
    assert waited < 0.05 + 0.15, f"answered {waited:.3f}s after a 50 ms deadline"
    bad = post(server.url + "/predict", [0.0] * 64, headers={"X-Request-Timeout-Ms": "soon"})
    assert bad.status_code == 400 and "X-Request-Timeout-Ms" in bad.json()["error"]


@pytest.mark.parametrize("front", FRONTS)
def test_a_failing_batch_is_a_clean_500_and_the_worker_keeps_serving(server_factory: Any, front: str) -> None:
    server = flood_server(server_factory, front, max_queue=8)
    for corner in (fakes.RAISE, fakes.WRONG_SHAPE):
        answer = post(server.url + "/predict", [corner] + [0.0] * 63)
        assert answer.status_code == 500 and set(answer.json()) == {"error"}
        assert "secret" not in answer.text and "Traceback" not in answer.text
    assert post(server.url + "/predict", [0.0] * 64).status_code == 200


def pool_health(url: str, clients: int) -> list[str]:
    """The worker ids that answered ``/health`` to ``clients`` concurrent clients, 4 requests each."""
    def worker_id(_: int) -> str:
        return str(requests.get(url + "/health", timeout=5, headers={"Connection": "close"}).json()["worker"])

    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(worker_id, range(4 * clients)))


@pytest.mark.parametrize("front", FRONTS)
def test_metrics_add_up_across_workers(server_factory: Any, digits: Any, front: str) -> None:
    server = server_factory(model="digits-torch", backend="onnx", mode="batched", workers=2, threads=8,
                            **FRONTS[front]).start()
    sample = digits.x_test[0].tolist()
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda _: post(server.url + "/predict/label", sample).status_code, range(200)))
    assert statuses == [200] * 200
    # Which worker accepts a connection is up to the kernel and the workers' loops (an idle uvicorn worker
    # may win every accept of a sequential client), so ask from 8 clients until both have answered.
    pids: set[str] = set()
    deadline = time.monotonic() + 10
    while len(pids) < 2 and time.monotonic() < deadline:
        pids |= set(pool_health(server.url, 8))
    assert len(pids) == 2, "both workers answered"
    line = 'serving_requests_total{endpoint="/predict/label",method="POST",status="200"} 200.0'
    text = server.metrics(until=lambda text: line in text)
    assert line in text, [x for x in text.splitlines() if x.startswith("serving_requests_total")]
    assert 'serving_model_info{backend="onnx"' in text and "serving_inference_latency_seconds_bucket" in text
    assert "serving_model_load_seconds" in text and "serving_queue_depth" in text


@pytest.mark.parametrize("front", FRONTS)
def test_sighup_under_load_loses_no_request(server_factory: Any, digits: Any, front: str) -> None:
    server = server_factory(model="digits-torch", backend="onnx", mode="batched", workers=2, threads=8,
                            **FRONTS[front]).start()
    sample = digits.x_test[3].tolist()
    stop = threading.Event()
    results: list[int | str] = []

    def client() -> None:
        while not stop.is_set():
            try:
                results.append(post(server.url + "/predict/label", sample).status_code)
            except requests.RequestException as exc:
                results.append(type(exc).__name__)

    threads = [threading.Thread(target=client) for _ in range(6)]
    for thread in threads:
        thread.start()
    time.sleep(1.5)
    old_workers = {requests.get(server.url + "/health", timeout=5).json()["worker"] for _ in range(10)}
    server.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    time.sleep(4)
    stop.set()
    for thread in threads:
        thread.join(30)
    assert len(results) > 100
    assert Counter(results) == {200: len(results)}, Counter(results)
    new_workers = {requests.get(server.url + "/health", timeout=5).json()["worker"] for _ in range(10)}
    assert not old_workers & new_workers, "SIGHUP replaced the workers"
