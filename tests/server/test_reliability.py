"""Reliability under faults and overload, through real gunicorn: every promise of the README's
"Reliability" section has its test here (hostile input is in test_hostile_input.py)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest
import requests

from serving.observability.memory import tree_memory
from tests import fakes
from tests.asgi_support import FRONTS, RECYCLED
from tests.conftest import ROOT, GunicornServer, free_port

pytestmark = pytest.mark.slow
JSON = {"Content-Type": "application/json", "Connection": "close"}
SAMPLE = [0.0] * 64
FAULTY = "tests.fakes:FaultyOnnx"


def post(url: str, data: Any = SAMPLE, timeout: float = 10, headers: dict[str, str] | None = None
         ) -> requests.Response:
    return requests.post(url + "/predict/label", data=orjson.dumps({"data": data}), timeout=timeout,
                         headers={**JSON, **(headers or {})})


class Load:
    """Client threads posting continuously (one connection per request) until stopped."""

    def __init__(self, url: str, clients: int = 4, data: Any = SAMPLE, timeout: float = 10) -> None:
        self.url, self.data, self.timeout = url, data, timeout
        self.results: list[tuple[int | str, float]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def _client(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                outcome: int | str = post(self.url, self.data, self.timeout).status_code
            except requests.RequestException as exc:
                outcome = type(exc).__name__
            self.results.append((outcome, time.monotonic() - started))

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def outcomes(self) -> Counter[int | str]:
        return Counter(outcome for outcome, _ in self.results)


def workers_of(server: GunicornServer) -> set[int]:
    return {p.pid for p in psutil.Process(server.pid).children()}


def pool_processes(server: GunicornServer) -> set[int]:
    return {p.pid for p in tree_memory(server.pid) if p.role == "pool"}


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if condition():
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout}s")


@pytest.mark.parametrize("front", FRONTS)
def test_sigkill_of_a_worker_under_load_fails_only_its_in_flight_request(server_factory: Any, front: str) -> None:
    server = server_factory(model="digits-torch", backend="onnx", mode="process", workers=2, **FRONTS[front]).start()
    victim = sorted(workers_of(server))[0]
    with Load(server.url, clients=4) as load:
        time.sleep(1.0)
        os.kill(victim, signal.SIGKILL)
        recovered = wait_until(lambda: len(workers_of(server)) == 2 and victim not in workers_of(server), 20,
                               "gunicorn replaced the killed worker")
        wait_until(lambda: requests.get(server.url + "/health/ready", timeout=2).status_code == 200, 20, "ready")
        time.sleep(1.0)
    outcomes = load.outcomes()
    failed = sum(n for outcome, n in outcomes.items() if outcome != 200)
    # a sync worker holds at most one request; an ASGI worker every connection it accepted (4 clients)
    assert outcomes[200] > 100 and failed <= {"wsgi": 1, "asgi": 4}[front], outcomes
    assert recovered < 20


@pytest.mark.parametrize("front", FRONTS)
@pytest.mark.parametrize("mode", ["process", "batched", "pool"])
def test_graceful_reload_and_worker_recycling_under_load_fail_nothing(server_factory: Any, mode: str,
                                                                      front: str) -> None:
    where = {"mode": "threaded", "model_pool": 1} if mode == "pool" else {"mode": mode}
    server = server_factory(model="digits-torch", backend="onnx", workers=2, max_requests=40,
                            max_requests_jitter=10, **where, **FRONTS[front]).start()
    first = workers_of(server) | pool_processes(server)
    with Load(server.url, clients=4) as load:
        time.sleep(2.0)
        server.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        time.sleep(3.0)
    outcomes = load.outcomes()
    assert set(outcomes) == {200} and outcomes[200] > 200, outcomes
    # the pool's arbiter stays: SIGHUP makes it replace the pool's processes
    kept = {p.pid for p in tree_memory(server.pid) if p.role == "pool-arbiter"}
    assert len(kept) == (mode == "pool")
    assert first & (workers_of(server) | pool_processes(server)) == kept, "reload replaced every worker"
    assert RECYCLED[front] in server.log(), "max_requests recycled workers during the run"


@pytest.mark.parametrize("front", FRONTS)
def test_sigterm_under_load_completes_in_flight_and_queued_requests(server_factory: Any, front: str) -> None:
    server = server_factory(model="digits-torch", backend=FAULTY, mode="batched", workers=1, threads=16,
                            max_batch_size=1, max_delay_ms=0, graceful_timeout=20, **FRONTS[front]).start()
    slow = [fakes.SLOW] + [0.0] * 63  # 200 ms per model call: 6 requests need 1.2 s in one model thread
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(post, server.url, slow, 20) for _ in range(6)]
        time.sleep(0.3)
        server.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        time.sleep(0.2)
        started = time.monotonic()
        with pytest.raises(requests.ConnectionError):
            post(server.url, timeout=5)  # a new connection is refused, not hung
        assert time.monotonic() - started < 1.0
        statuses = [f.result().status_code for f in futures]
    assert statuses == [200] * 6
    assert server.proc.wait(30) == 0  # type: ignore[union-attr]


@pytest.mark.parametrize("front", FRONTS)
def test_faulty_model_in_process_mode_is_a_clean_500_and_the_worker_lives(server_factory: Any, front: str) -> None:
    server = server_factory(model="digits-torch", backend=FAULTY, mode="process", workers=1, **FRONTS[front]).start()
    before = workers_of(server)
    for corner in (fakes.RAISE, fakes.WRONG_SHAPE):
        answer = post(server.url, [corner] + [0.0] * 63)
        assert answer.status_code == 500 and set(answer.json()) == {"error"}
        assert "secret" not in answer.text and "Traceback" not in answer.text and "/" not in answer.json()["error"]
    assert post(server.url).status_code == 200 and workers_of(server) == before


def test_hung_inference_in_process_mode_answers_504_at_the_deadline_and_the_worker_lives(
        server_factory: Any) -> None:
    server = server_factory(model="digits-torch", backend=FAULTY, mode="process", workers=2, timeout=10,
                            request_timeout_ms=1000).start()
    before = workers_of(server)
    with ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        hung = pool.submit(post, server.url, [fakes.HANG] + [0.0] * 63, 20)
        time.sleep(0.3)
        assert post(server.url).status_code == 200, "the other worker keeps serving"
        answer = hung.result()
        waited = time.monotonic() - started
    assert answer.status_code == 504 and "deadline" in answer.json()["error"], answer.text
    assert waited < 1.0 + 0.5, f"answered {waited:.2f}s after a 1 s deadline"
    assert workers_of(server) == before, "the worker survived its hung call"
    assert post(server.url).status_code == 200


def test_gunicorn_timeout_replaces_a_worker_stuck_past_its_deadline(server_factory: Any) -> None:
    """The backstop: a deadline longer than gunicorn's timeout (or a call stuck in C) gets the worker killed."""
    server = server_factory(model="digits-torch", backend=FAULTY, mode="process", workers=2, timeout=2,
                            request_timeout_ms=60_000).start()
    before = workers_of(server)
    with pytest.raises(requests.RequestException):
        answer = post(server.url, [fakes.HANG] + [0.0] * 63, 20)
        assert answer.status_code >= 500  # gunicorn's own answer when it aborts a worker mid-request
        raise requests.ConnectionError("aborted")
    wait_until(lambda: len(workers_of(server)) == 2 and workers_of(server) != before, 15, "hung worker replaced")
    assert "WORKER TIMEOUT" in server.log()
    wait_until(lambda: post(server.url).status_code == 200, 15, "healthy again")


def test_hung_inference_in_batched_mode_answers_504_and_the_watchdog_restarts_the_worker(
        server_factory: Any) -> None:
    server = server_factory(model="digits-torch", backend=FAULTY, mode="batched", workers=1, threads=8, timeout=3,
                            graceful_timeout=3, max_batch_size=1, max_delay_ms=0, request_timeout_ms=1000).start()
    before = workers_of(server)
    with ThreadPoolExecutor(4) as pool:
        hung = pool.submit(post, server.url, [fakes.HANG] + [0.0] * 63, 20)
        time.sleep(0.2)
        started = time.monotonic()
        behind = [pool.submit(post, server.url, SAMPLE, 20) for _ in range(3)]
        statuses = [f.result().status_code for f in behind]
        assert statuses == [504] * 3 and time.monotonic() - started < 2.0, "not stuck behind the hung call"
        assert hung.result().status_code == 504
    wait_until(lambda: workers_of(server) and not workers_of(server) & before, 20, "watchdog restarted worker")
    assert "restarting the worker" in server.log()
    wait_until(lambda: post(server.url).status_code == 200, 20, "healthy again")


@pytest.mark.parametrize("front", FRONTS)
def test_a_new_model_version_is_served_after_reload_without_a_failed_request(server_factory: Any,
                                                                            repo_copy: Path, front: str) -> None:
    server = server_factory(repo=repo_copy, model="digits-torch", backend="onnx", mode="process",
                            **FRONTS[front]).start()
    assert requests.get(server.url + "/metadata", timeout=5).json()["version"] == 1
    with Load(server.url, clients=3) as load:
        time.sleep(1.0)
        staging = repo_copy / "digits-torch" / ".staging-test"
        shutil.copytree(repo_copy / "digits-torch" / "1", staging)
        meta = orjson.loads((staging / "metadata.json").read_bytes())
        meta["version"] = 2
        (staging / "metadata.json").write_bytes(orjson.dumps(meta))
        staging.rename(repo_copy / "digits-torch" / "2")  # appears atomically, as train.py publishes
        server.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        wait_until(lambda: requests.get(server.url + "/metadata", timeout=5).json()["version"] == 2, 30,
                   "version 2 served")
        time.sleep(1.0)
    assert set(load.outcomes()) == {200}, load.outcomes()


@pytest.mark.parametrize("front", FRONTS)
def test_sustained_overload_gets_fast_rejections_bounded_memory_and_instant_recovery(server_factory: Any,
                                                                                    front: str) -> None:
    server = server_factory(model="digits-torch", backend=FAULTY, mode="batched", workers=2, threads=16,
                            max_batch_size=4, max_queue=8, request_timeout_ms=2000, **FRONTS[front]).start()
    slow = [fakes.SLOW] + [0.0] * 63  # capacity: 2 workers x 4 samples / 200 ms = 40 req/s
    rss: list[float] = []
    with Load(server.url, clients=48, data=slow, timeout=10) as load:  # 48 closed-loop clients: >= 3x
        for _ in range(30):
            time.sleep(1.0)
            rss.append(sum(p.memory_info().rss for p in psutil.Process(server.pid).children()) / 2**20)
    outcomes = load.outcomes()
    assert set(outcomes) <= {200, 503, 504}, outcomes
    served = outcomes[200] / 30
    offered = sum(outcomes.values()) / 30
    assert offered >= 3 * served, f"offered {offered:.0f} req/s vs served {served:.0f} req/s: not 3x capacity"
    rejections = sorted(elapsed for outcome, elapsed in load.results if outcome in (503, 504))
    p99 = rejections[int(len(rejections) * 0.99) - 1]
    assert p99 < 2.0 * 0.5, f"p99 of rejections {p99:.3f}s is not well under the 2 s request timeout"
    assert max(rss[5:]) < 1.25 * rss[4] + 50, f"memory grew under overload: {rss}"
    started = time.monotonic()
    assert post(server.url).status_code == 200 and time.monotonic() - started < 1.0, "healthy at once"


@pytest.fixture
def nginx_front(tmp_path: Path) -> Callable[[int], str]:
    """Start nginx from deploy/nginx.conf (ports rewritten) in front of a given port; stopped after."""
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        pytest.fail("nginx is not installed: .ci/run installs it with apt-get install nginx")
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    processes: list[subprocess.Popen[bytes]] = []
    errors = open(tmp_path / "nginx.err", "wb")  # noqa: SIM115 - closed after nginx stops

    def start(upstream_port: int) -> str:
        port = free_port()
        conf = (ROOT / "deploy" / "nginx.conf").read_text()
        conf = conf.replace("127.0.0.1:8000", f"127.0.0.1:{upstream_port}").replace("127.0.0.1:8080",
                                                                                     f"127.0.0.1:{port}")
        conf = conf.replace("worker_processes auto;", "worker_processes 1;\ndaemon off;")
        (tmp_path / "nginx.conf").write_text(conf)
        processes.append(subprocess.Popen([binary, "-c", str(tmp_path / "nginx.conf"), "-p", str(tmp_path)],
                                          stderr=errors))
        wait_until(lambda: _connectable(port), 10, "nginx listening")
        return f"http://127.0.0.1:{port}"

    yield start
    for process in processes:
        process.terminate()
        process.wait(10)
    errors.close()


def _connectable(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def slow_body_client(port: int, stop: threading.Event) -> None:
    """Send a valid request's body one byte every 100 ms (a slowloris on the body)."""
    body = orjson.dumps({"data": SAMPLE})
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"POST /predict/label HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode())
            for byte in body:
                if stop.is_set():
                    return
                sock.sendall(bytes([byte]))
                time.sleep(0.1)
    except OSError:
        return


def test_slow_clients_behind_nginx_do_not_take_the_service_down(server_factory: Any, nginx_front: Any) -> None:
    server = server_factory(model="digits-torch", backend="onnx", mode="process", workers=2).start()
    front = nginx_front(server.port)
    front_port = int(front.rsplit(":", 1)[1])
    stop = threading.Event()
    slow = [threading.Thread(target=slow_body_client, args=(front_port, stop), daemon=True) for _ in range(8)]
    for thread in slow:
        thread.start()
    try:
        time.sleep(1.0)  # 8 slow clients, 2 sync workers: direct, every worker would be stuck reading
        latencies = []
        for _ in range(20):
            started = time.monotonic()
            answer = requests.post(front + "/predict/label", data=orjson.dumps({"data": SAMPLE}), headers=JSON,
                                   timeout=5)
            latencies.append(time.monotonic() - started)
            assert answer.status_code == 200 and answer.headers["X-Request-ID"]
        assert max(latencies) < 0.5, latencies
        huge = requests.post(front + "/predict/label", data=b"x" * (3 * 2**20), headers=JSON, timeout=10)
        assert huge.status_code == 413
    finally:
        stop.set()
        for thread in slow:
            thread.join(5)


@pytest.mark.parametrize("front", FRONTS)
def test_declared_oversized_body_is_refused_before_it_is_sent(server_factory: Any, front: str) -> None:
    server = server_factory(model="digits-torch", backend="onnx", mode="process", workers=1, **FRONTS[front]).start()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 104857600\r\n\r\n{\"data\": [")
        started = time.monotonic()
        reply = b""
        while b'"error"' not in reply and time.monotonic() - started < 5.0:
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
        assert time.monotonic() - started < 2.0, "answered without waiting for 100 MB"
    assert reply.startswith(b"HTTP/1.1 413") and b'"error"' in reply


@pytest.mark.parametrize("front", FRONTS)
def test_decompression_bomb_and_long_request_ids(server_factory: Any, front: str) -> None:
    import io

    from PIL import Image

    server = server_factory(model="digits-torch", backend="onnx", mode="process", workers=1, **FRONTS[front]).start()
    bomb = io.BytesIO()
    Image.new("L", (5000, 5000), 0).save(bomb, format="PNG")  # 25 Mpixel in about 25 kB
    assert len(bomb.getvalue()) < 100_000
    answer = requests.post(server.url + "/predict/label", data=bomb.getvalue(), timeout=10,
                           headers={"Content-Type": "image/png"})
    assert answer.status_code == 413 and "pixels" in answer.json()["error"]
    for hostile in ("x" * 129, "abc\r\nSet-Cookie: a=b", "<script>", "ok id"):
        reply = requests.get(server.url + "/health", headers={"X-Request-ID": hostile.replace("\r\n", "")},
                             timeout=5)
        assert reply.headers["X-Request-ID"] != hostile.replace("\r\n", "")
        assert len(reply.headers["X-Request-ID"]) == 32
    assert "<script>" not in server.log() and "x" * 129 not in server.log()
