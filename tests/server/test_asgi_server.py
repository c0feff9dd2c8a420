"""The ASGI front through real gunicorn, under both ASGI workers: the same answers as the WSGI server,
no Nagle stall on keep-alive (uvicorn issue #3149), a stream that arrives line by line, a hung model
call answered at the deadline and its worker replaced, 2,000 idle keep-alive connections with flat
memory. The reliability promises shared with WSGI are parametrized in test_reliability.py and
test_batched.py."""

from __future__ import annotations

import http.client
import resource
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest
import requests

from serving.protocol.endpoints import ENDPOINTS
from serving.tools.testing import free_port, metric_total
from tests import fakes
from tests.asgi_support import (
    ASGI_WORKERS,
    FRONTS,
    JSON,
    SAMPLE,
    Probe,
    Reply,
    covering_probes,
    normalized,
    parity_probes,
)
from tests.conftest import ROOT, clean_env

pytestmark = pytest.mark.slow
BODY = orjson.dumps({"data": SAMPLE})


def over_http(url: str, probe: Probe) -> Reply:
    answer = requests.request(probe.method, url + probe.path, data=probe.body or None, headers=dict(probe.headers),
                              timeout=10)
    headers = {name.lower(): value for name, value in answer.headers.items()}
    return Reply(answer.status_code, headers.get("content-type", ""), answer.content, headers)


def test_both_asgi_workers_answer_every_endpoint_like_the_wsgi_server(server_factory: Any) -> None:
    settings = {"model": "digits-torch", "backend": "onnx", "mode": "threaded", "workers": 1}
    wsgi = server_factory(**settings).start()
    asgi = {name: server_factory(args=args, **settings, **FRONTS["asgi"]).start()
            for name, args in ASGI_WORKERS.items()}
    probes = covering_probes(ENDPOINTS, parity_probes())
    for probe in probes:
        expected = normalized(probe, over_http(wsgi.url, probe))
        for name, server in asgi.items():
            got = normalized(probe, over_http(server.url, probe))
            if probe.path == "/predict/stream" and got.status == 200:
                assert "content-length" not in got.headers, "streamed"
                expected.headers.pop("content-length", None)
            assert got == expected, (name, probe)


def keep_alive_latencies(port: int, requests_: int = 40) -> list[float]:
    """Sequential POSTs on one keep-alive connection: each one's round trip in ms."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    latencies = []
    try:
        for _ in range(requests_):
            started = time.perf_counter()
            connection.request("POST", "/predict/label", body=BODY, headers={"Content-Type": JSON})
            answer = connection.getresponse()
            assert answer.status == 200 and answer.read()
            latencies.append((time.perf_counter() - started) * 1000)
    finally:
        connection.close()
    return latencies[1:]


@pytest.mark.parametrize("worker", ASGI_WORKERS)
def test_keep_alive_requests_do_not_wait_for_a_delayed_ack(server_factory: Any, worker: str, tmp_path: Path) -> None:
    """uvicorn issue #3149: a listener uvicorn binds itself (--workers N) has no TCP_NODELAY, so on Linux the
    answer's second segment waits for the client's delayed ACK, ~40 ms per keep-alive request. gunicorn
    binds with TCP_NODELAY, which accepted sockets inherit. The control is uvicorn --workers 2 itself."""
    server = server_factory(model="digits-torch", backend="onnx", mode="threaded", workers=2,
                            args=ASGI_WORKERS[worker], **FRONTS["asgi"]).start()
    ours = statistics.median(keep_alive_latencies(server.port))
    port = free_port()
    env = clean_env(SERVING_MODEL_REPOSITORY=str(server.env["SERVING_MODEL_REPOSITORY"]), SERVING_MODEL="digits-torch",
                    SERVING_BACKEND="onnx", SERVING_MODE="threaded", SERVING_WORKERS="2")
    with open(tmp_path / "uvicorn.log", "wb") as log:
        control = subprocess.Popen([sys.executable, "-m", "uvicorn", "asgi_server:app", "--workers", "2", "--port",
                                    str(port), "--loop", "asyncio", "--http", "httptools", "--no-access-log"],
                                   cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if requests.get(f"http://127.0.0.1:{port}/health/ready", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.2)
        stalled = statistics.median(keep_alive_latencies(port))
    finally:
        control.terminate()
        control.wait(20)
    assert stalled > 30, f"the control no longer stalls ({stalled:.1f} ms): uvicorn fixed #3149?"
    assert ours < 10, f"keep-alive median {ours:.1f} ms under gunicorn ({worker}): Nagle is on"


def test_the_stream_sends_each_line_as_its_chunk_is_done(server_factory: Any) -> None:
    """With a 200 ms model call per chunk (1, 2, 4 samples), the first line arrives ~0.6 s before the last."""
    slow = [fakes.SLOW] + [0.0] * 63
    body = orjson.dumps({"data": [slow] * 7})
    arrivals: dict[str, list[float]] = {}
    for front in FRONTS:
        server = server_factory(model="digits-torch", backend=fakes.__name__ + ":FaultyOnnx", mode="threaded",
                                workers=1, **FRONTS[front]).start()
        started = time.monotonic()
        with requests.post(server.url + "/predict/stream", data=body, headers={"Content-Type": JSON}, stream=True,
                           timeout=10) as answer:
            assert answer.status_code == 200 and answer.headers["Content-Type"] == "application/x-ndjson"
            times, lines, pending = [], [], b""
            for chunk in answer.iter_content(chunk_size=None):  # each chunk as it arrives
                pending += chunk
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    times.append(time.monotonic() - started)
                    lines.append(orjson.loads(line))
        assert [line["index"] for line in lines] == list(range(7))
        arrivals[front] = times
    asgi, wsgi = arrivals["asgi"], arrivals["wsgi"]
    assert asgi[-1] - asgi[0] > 0.3, f"the ASGI lines came together: {asgi}"
    assert asgi[0] < 0.45 and asgi[3] - asgi[1] > 0.1, asgi  # lines 1, 2-3, 4-7 after 0.2, 0.4 and 0.6 s
    assert wsgi[-1] - wsgi[0] < 0.1, f"the WSGI app sends the lines whole: {wsgi}"


def test_a_hung_model_call_is_answered_at_the_deadline_and_the_watchdog_replaces_the_worker(
        server_factory: Any) -> None:
    """What SIGALRM and gunicorn's heartbeat do for sync workers, for pool threads: 504 at the longest
    deadline, the other threads keep serving, and the worker is restarted once the call outlives `timeout`."""
    server = server_factory(model="digits-torch", backend=fakes.__name__ + ":FaultyOnnx", mode="threaded",
                            workers=1, timeout=4, request_timeout_ms=1000, **FRONTS["asgi"]).start()
    before = {p.pid for p in psutil.Process(server.pid).children()}
    started = time.monotonic()
    hung = requests.post(server.url + "/predict", data=orjson.dumps({"data": [fakes.HANG] + [0.0] * 63}),
                         headers={"Content-Type": JSON}, timeout=10)
    waited = time.monotonic() - started
    assert hung.status_code == 504 and "deadline" in hung.json()["error"] and waited < 1.5, (waited, hung.text)
    assert requests.post(server.url + "/predict", data=BODY, headers={"Content-Type": JSON}, timeout=5).ok
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and {p.pid for p in psutil.Process(server.pid).children()} & before:
        time.sleep(0.2)
    assert not {p.pid for p in psutil.Process(server.pid).children()} & before, "the worker was not replaced"
    assert "restarting the worker" in server.log()
    server.wait_ready(30)


def rss_mb(server: Any) -> float:
    return sum(p.memory_info().rss for p in psutil.Process(server.pid).children()) / 2**20


def test_two_thousand_idle_keep_alive_connections_on_two_workers(server_factory: Any) -> None:
    """2,000 connections that each sent one request and then stay idle (plus 8 clients trickling a body),
    while a client still gets its usual p99, and the workers' memory stays flat."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4500:
        pytest.skip(f"needs 4,500 file descriptors; the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4500), hard))  # the server inherits it
    # The 2,000 first requests arrive at once: let them queue (this test is about idle connections, not the
    # fast 503 of an overflowing queue, which tests/server/test_reliability.py covers on both fronts).
    server = server_factory(model="digits-torch", backend="onnx", mode="threaded", workers=2, keepalive=120,
                            max_queue=2100, **FRONTS["asgi"]).start()
    request = (b"POST /predict/label HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY))

    def p99_ms() -> float:
        latencies = keep_alive_latencies(server.port, 201)
        return sorted(latencies)[int(len(latencies) * 0.99) - 1]

    for _ in range(2):
        p99_ms()  # warm both workers
    before_ms, before_mb = p99_ms(), rss_mb(server)
    idle: list[socket.socket] = []
    try:
        for _ in range(2000):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            sock.sendall(request)
            idle.append(sock)
        for sock in idle:
            assert sock.recv(65536).startswith(b"HTTP/1.1 200"), "every idle connection got its answer"
        trickling = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(8)]
        for sock in trickling:
            sock.sendall(request[:-10])
        idle += trickling
        time.sleep(1.0)
        during_ms, during_mb = p99_ms(), rss_mb(server)
        connections = sum(len(p.net_connections("tcp")) for p in psutil.Process(server.pid).children())
    finally:
        for sock in idle:
            sock.close()
    assert connections >= 2008, f"the workers hold {connections} connections"
    assert during_ms < 2 * before_ms + 5, f"p99 {during_ms:.1f} ms with 2,008 idle connections, {before_ms:.1f} before"
    assert during_mb - before_mb < 60, f"RSS of 2 workers {before_mb:.0f} -> {during_mb:.0f} MB"


def test_batched_requests_wait_on_the_event_loop_without_a_thread_each(server_factory: Any) -> None:
    """Batched mode on the ASGI front with a request pool of ONE thread: while the model thread is busy,
    47 requests wait for their batch without a thread each (the worker runs no more threads than idle),
    then run as batches of many, and every one gets its own sample's answer. A design where a request
    holds a pool thread until its batch returns could only run them one by one here."""
    server = server_factory(model="digits-torch", backend="tests.fakes:FaultyOnnx", mode="batched", workers=1,
                            threads=1, max_batch_size=32, max_delay_ms=20, max_queue=64, **FRONTS["asgi"]).start()
    worker = psutil.Process(server.pid).children()[0]
    idle_threads = worker.num_threads()
    samples = [[0.0] + [i / 64.0] * 63 for i in range(48)]
    samples[0][0] = fakes.SLOW  # holds the model thread for fakes.SLOW_S while the others arrive

    def ask(i: int) -> list[float]:
        answer = requests.post(server.url + "/predict", data=orjson.dumps({"data": samples[i]}), timeout=10,
                               headers={"Content-Type": JSON, "Connection": "close"})
        assert answer.status_code == 200, answer.text
        return answer.json()["prediction"][0]

    with ThreadPoolExecutor(48) as pool:
        slow = pool.submit(ask, 0)
        time.sleep(0.05)
        rest = [pool.submit(ask, i) for i in range(1, 48)]
        time.sleep(0.1)
        waiting_threads = worker.num_threads()  # 47 requests are waiting now
        got = [slow.result(), *(future.result() for future in rest)]
    for i in (1, 17, 47):
        alone = requests.post(server.url + "/predict", data=orjson.dumps({"data": samples[i]}), timeout=10,
                              headers={"Content-Type": JSON}).json()["prediction"][0]
        assert got[i] == pytest.approx(alone, abs=1e-5)
    assert waiting_threads <= idle_threads, f"{idle_threads} threads idle, {waiting_threads} with 47 waiting"

    text = server.metrics(until=lambda t: metric_total(t, "serving_batch_size_sum") >= 48 + 3)
    batches = metric_total(text, "serving_batch_size_count")
    at_most_four = [float(line.split()[-1]) for line in text.splitlines()
                    if line.startswith("serving_batch_size_bucket") and 'le="4.0"' in line]
    assert at_most_four, text
    assert batches - sum(at_most_four) >= 1, f"no batch of more than 4 samples among {batches:.0f} batches"
