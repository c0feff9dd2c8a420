"""One copy for every worker (issue 24), through real gunicorn: what the master shares before fork, the
memory gauge on /metrics, and the model pool on both fronts, killed and refused."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import pytest
import requests

from serving.observability.memory import tree_memory
from serving.tools.testing import metric_total
from tests import fakes
from tests.asgi_support import FRONTS

pytestmark = pytest.mark.slow
SAMPLE = {"data": [[0.0] * 8 for _ in range(8)]}


def warm(url: str, count: int = 60) -> list[list[float]]:
    """Send ``count`` predictions (every worker serves some); the distinct answers."""
    answers = []
    for _ in range(count):
        reply = requests.post(url + "/predict", json=SAMPLE, timeout=10)
        assert reply.status_code == 200, reply.text
        answers.append(reply.json()["prediction"][0])
    return answers


def mapped_libraries(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def total_pss(pid: int) -> int:
    return sum(p.pss for p in tree_memory(pid))


@pytest.mark.parametrize("backend", ["onnx", "pytorch"])
def test_the_master_shares_the_framework_and_the_server_costs_less(server_factory: Any, backend: str) -> None:
    model = "digits-torch" if backend == "pytorch" else "digits-tf"
    totals = {}
    for share in ("false", "true"):
        with server_factory(model=model, backend=backend, workers=4, share_memory=share) as server:
            answers = warm(server.url)
            time.sleep(0.5)
            totals[share] = total_pss(server.pid)
            library = "libonnxruntime" if backend == "onnx" else "libtorch"
            assert (library in mapped_libraries(server.pid)) == (share == "true")
            if share == "true":
                assert "shared by every worker: serving.fronts.wsgi" in server.log()
                assert f"loaded {model}:1" in server.log()  # the weights too: one copy, loaded before fork
                assert all(a == answers[0] for a in answers)
    # measured: onnx 356 -> 158 MB at -w 8; pytorch 754 -> 276 MB at -w 4 (bench/memory.py)
    assert totals["true"] < 0.75 * totals["false"], totals


@pytest.mark.parametrize(("backend", "model"), [("onnx", "digits-tf"), ("tensorflow", "digits-tf"),
                                                ("pytorch", "digits-torch")])
def test_workers_of_a_sharing_master_exit_at_once_and_cleanly(server_factory: Any, backend: str, model: str) -> None:
    # Before leave_worker: onnxruntime's static destructors hung or aborted in the forked workers as they exited,
    # so a reload waited for the graceful timeout and a worker that failed to boot died by SIGABRT, not code 3.
    with server_factory(model=model, backend=backend, workers=2, model_pool=0) as server:
        warm(server.url, 20)
        old = {p.pid for p in tree_memory(server.pid) if p.role == "worker"}
        os.kill(server.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and old & {p.pid for p in tree_memory(server.pid)}:
            time.sleep(0.1)
        assert not old & {p.pid for p in tree_memory(server.pid)}, "old workers still there 10 s after a reload"
        warm(server.url, 20)
    log = server.log()
    assert "terminate called" not in log and "was sent" not in log and "exited with code" not in log, log[-3000:]
    assert log.count("Worker exiting") >= 4


def test_the_memory_gauge_adds_up_to_what_proc_says(server_factory: Any) -> None:
    with server_factory(model="digits-tf", backend="onnx", workers=2) as server:
        warm(server.url, 20)
        text = requests.get(server.url + "/metrics", timeout=10).text
        measured = {p.pid: p for p in tree_memory(server.pid)}
    rows = [line for line in text.splitlines() if line.startswith("serving_process_memory_bytes{")]
    pss = {int(line.split('pid="')[1].split('"')[0]): float(line.rsplit(" ", 1)[1]) for line in rows
           if 'kind="pss"' in line}
    assert set(pss) == set(measured), (pss, measured)
    assert any('role="master"' in line for line in rows) and sum('role="worker"' in line for line in rows) == 6
    assert sum(pss.values()) == pytest.approx(sum(p.pss for p in measured.values()), rel=0.2)


@pytest.mark.parametrize(("front", "count"), [("wsgi", 1), ("asgi", 2)])
def test_the_pool_serves_every_worker_which_imports_no_framework(server_factory: Any, front: str,
                                                                 count: int) -> None:
    with server_factory(model="digits-tf", backend="onnx", workers=2, mode="threaded", model_pool=count,
                        **FRONTS[front]) as server:
        first = requests.post(server.url + "/predict", json=SAMPLE, timeout=10)
        assert first.status_code == 200, first.text
        expected = first.json()["prediction"]
        assert all(answer == expected[0] for answer in warm(server.url, 30))
        processes = tree_memory(server.pid)
        roles = [p.role for p in processes]
        assert roles.count("pool") == count and roles.count("worker") == 2, roles
        for process in processes:
            mapped = "libonnxruntime" in mapped_libraries(process.pid)
            # the pool's arbiter imports the framework for several pool processes to share (and their
            # fast respawns); for one it would only be a second copy
            assert mapped == (process.role == "pool" or (process.role == "pool-arbiter" and count > 1)), process
        v2 = requests.post(server.url + "/v2/models/digits-tf/infer", timeout=10, json={
            "inputs": [{"name": "input", "shape": [2, 8, 8], "datatype": "FP32", "data": [0.0] * 128}]})
        assert v2.status_code == 200, v2.text
        assert "the model pool" in server.log()
        # the model's calls are the pool's, counted once there: 32 requests of 33 samples in all, and each
        # worker's start-up check of the model's sample (one call of one sample, not a request)
        text = server.metrics(until=lambda t: metric_total(t, "serving_batch_size_sum") >= 33 + 2
                              and metric_total(t, "serving_pool_call_seconds_count") >= 32)
        assert metric_total(text, "serving_batch_size_sum") == 33 + 2
        batches = metric_total(text, "serving_batch_size_count")
        assert 0 < batches <= 32 + 2 and metric_total(text, "serving_inference_latency_seconds_count") == batches
        assert metric_total(text, "serving_pool_call_seconds_count") == 32


def test_the_pool_queue_depth_is_on_metrics_and_goes_with_a_killed_pool_process(server_factory: Any) -> None:
    # one slow sample per model call (200 ms): 16 requests queue in the pool for about 3 s
    server = server_factory(model="digits-torch", backend="tests.fakes:FaultyOnnx", workers=2, mode="threaded",
                            model_pool=1, pool_max_batch_size=1).start()
    slow = {"data": [fakes.SLOW] + [0.0] * 63}

    def ask(_: int) -> int:
        return requests.post(server.url + "/predict", json=slow, timeout=30).status_code

    with ThreadPoolExecutor(16) as clients:
        answers = [clients.submit(ask, i) for i in range(16)]
        next(as_completed(answers))  # one answered before the kill: the rest get a 503 or a retry
        text = server.metrics(until=lambda t: metric_total(t, "serving_queue_depth") >= 2, timeout=5)
        assert metric_total(text, "serving_queue_depth") >= 2, text
        [pool] = [p.pid for p in tree_memory(server.pid) if p.role == "pool"]
        os.kill(pool, signal.SIGKILL)
        statuses = [answer.result() for answer in answers]
    assert set(statuses) <= {200, 503} and 200 in statuses, statuses
    # the dead process's last depth is not counted on: its arbiter marked it dead
    text = server.metrics(until=lambda t: metric_total(t, "serving_queue_depth") == 0, timeout=10)
    assert metric_total(text, "serving_queue_depth") == 0


def test_a_killed_pool_process_gets_503s_not_hangs_and_is_replaced(server_factory: Any) -> None:
    with server_factory(model="digits-tf", backend="onnx", workers=2, model_pool=1) as server:
        warm(server.url, 10)
        [pool] = [p.pid for p in tree_memory(server.pid) if p.role == "pool"]
        os.kill(pool, signal.SIGKILL)
        statuses, deadline = [], time.monotonic() + 30
        while time.monotonic() < deadline:
            started = time.monotonic()
            reply = requests.post(server.url + "/predict", json=SAMPLE, timeout=10)
            assert time.monotonic() - started < 3, "a request waited on the dead pool process"
            statuses.append(reply.status_code)
            if reply.status_code == 503:
                assert reply.headers["Retry-After"] == "1" and reply.json()["error"]
            elif reply.status_code == 200 and 503 in statuses:
                break
            assert reply.status_code in (200, 503), reply.text
            time.sleep(0.05)
        assert statuses[-1] == 200 and 503 in statuses, statuses
        [replacement] = [p.pid for p in tree_memory(server.pid) if p.role == "pool"]
        assert replacement != pool


@pytest.mark.parametrize("front", ["wsgi", "asgi"])
def test_a_request_in_flight_at_sigterm_is_answered_by_the_pool(server_factory: Any, front: str) -> None:
    # gunicorn signals its dirty arbiter together with the workers: the pool stopped while a worker still
    # read a request's body, which then got a 503 (the image's `docker stop` check). The pool stops last.
    server = server_factory(model="digits-tf", backend="onnx", workers=2, mode="threaded", model_pool=1,
                            **FRONTS[front]).start()
    expected = requests.post(server.url + "/predict", json=SAMPLE, timeout=10).json()["prediction"]
    body = json.dumps(SAMPLE).encode()
    head = (f"POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as client:
        client.sendall(head + body[:10])
        time.sleep(0.5)  # a worker holds the connection and waits for the rest of the body
        os.kill(server.pid, signal.SIGTERM)
        time.sleep(1.5)  # the workers drain; the pool has had time to stop if it were told to
        client.sendall(body[10:])
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["prediction"] == expected
    assert server.proc.wait(timeout=30) == 0, server.log()[-3000:]


def test_a_second_server_leaves_the_first_ones_pool_alone(server_factory: Any) -> None:
    # gunicorn stops the dirty arbiter named in a pid file derived from proc_name, as an orphan, when a server
    # starts: two servers of one name on a machine took each other's model pool down.
    with server_factory(model="digits-tf", backend="onnx", workers=1, model_pool=1) as first:
        warm(first.url, 5)
        arbiter = [p.pid for p in tree_memory(first.pid) if p.role == "pool-arbiter"]
        with server_factory(model="digits-tf", backend="onnx", workers=1, model_pool=1) as second:
            warm(second.url, 5)
            warm(first.url, 20)
            assert [p.pid for p in tree_memory(first.pid) if p.role == "pool-arbiter"] == arbiter
        assert "orphaned dirty arbiter" not in second.log()


def test_a_server_stopped_while_its_pool_loads_stops_at_once(server_factory: Any) -> None:
    # The HTTP workers wait for the pool to serve the model; gunicorn's SIGTERM handler only marks a worker,
    # so a worker waiting for a pool that stopped with the server held the stop for the graceful timeout.
    server = server_factory(model="digits-tf", backend="tests.fakes:SlowLoad", workers=2, model_pool=1)
    server.start(wait=False)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "Booting worker" not in server.log():
        time.sleep(0.1)
    time.sleep(1.0)  # the workers are in their load, waiting for the pool
    started = time.monotonic()
    os.kill(server.pid, signal.SIGTERM)
    server.proc.wait(timeout=30)
    assert time.monotonic() - started < 10, server.log()[-3000:]


@pytest.mark.parametrize(("settings", "message"), [
    ({"mode": "batched"}, "SERVING_MODE=threaded"),
    ({"model_control": "explicit"}, "SERVING_MODEL_CONTROL must be none"),
])
def test_the_pool_refuses_settings_it_cannot_honour(server_factory: Any, settings: dict[str, str],
                                                      message: str) -> None:
    server = server_factory(model="digits-tf", backend="onnx", model_pool=1, **settings)
    with pytest.raises(AssertionError, match=message):
        server.start(timeout=30)


def test_the_master_builds_the_app_once_for_every_worker_and_again_on_reload(server_factory: Any) -> None:
    with server_factory(model="digits-torch", backend="pytorch", workers=2) as server:
        warm(server.url, 10)
        assert server.log().count("; the app built, made in the master") == 1, server.log()[-2000:]
        old = {p.pid for p in tree_memory(server.pid) if p.role == "worker"}
        crashed = old.pop()
        os.kill(crashed, signal.SIGKILL)  # a respawned worker serves the master's app too
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len({p.pid for p in tree_memory(server.pid)} - old - {server.pid}) < 1:
            time.sleep(0.1)
        warm(server.url, 10)
        os.kill(server.pid, signal.SIGHUP)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and "the app built again in the master" not in server.log():
            time.sleep(0.1)
        assert "the app built again in the master for the new workers" in server.log()
        time.sleep(1.0)
        warm(server.url, 20)
    log = server.log()
    assert "Traceback" not in log and "cannot build the app" not in log, log[-3000:]
