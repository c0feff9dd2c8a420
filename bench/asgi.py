"""WSGI against ASGI, in one run: the same models, modes and worker counts on both fronts (both ASGI
workers), the plain Flask / FastAPI / Starlette baselines making the same model call, batched mode at
concurrency, keep-alive latency (uvicorn issue #3149), idle and slow connections, and the stream.

    python -m bench.asgi [--seconds 8] [--workers 2] [--quick]

Every server runs as shipped (gunicorn.conf.py, request ids, access log, metrics, validation on) on
127.0.0.1 with wrk on the same cores; each front of a configuration runs right after the others, so
the ratios between them are measured minutes apart at most. Writes ``reports/asgi-<stamp>.md`` and
the raw output under ``reports/asgi-<stamp>/``.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import psutil
import requests

from bench.batching import ensure_large_models
from bench.harness import ROOT, WrkResult, model_server, run_wrk, save_report, wrk_script
from serving.toolchain.data import load_digits_dataset
from serving.tools.testing import GunicornServer, clean_env, free_port, stop_group

FRONTS: dict[str, tuple[str, tuple[str, ...]]] = {  # label -> (SERVING_FRONT, the worker class it runs under)
    "WSGI": ("wsgi", ()),
    "ASGI uvicorn-worker": ("asgi", ("-k", "serving.host.asgi_workers.UvicornWorker")),
    "ASGI gunicorn asgi": ("asgi", ("-k", "serving.host.asgi_workers.AsgiWorker")),
}
CONFIGS = [  # the throughput benchmark's 8x8 configurations: (label, model, backend, mode)
    ("onnx / process", "digits-torch", "onnx", "process"),
    ("onnx / threaded", "digits-tf", "onnx", "threaded"),
    ("pytorch / process", "digits-torch", "pytorch", "process"),
    ("tensorflow / process", "digits-tf", "tensorflow", "process"),
    ("tensorflow / threaded", "digits-tf", "tensorflow", "threaded"),
]
BASELINES = [  # (label, command after python -m, app)
    ("plain Flask + gunicorn sync", "gunicorn", "bench.baselines:flask_app"),
    ("plain FastAPI + uvicorn", "uvicorn", "bench.baselines:fastapi_app"),
    ("plain Starlette + uvicorn", "uvicorn", "bench.baselines:starlette_app"),
]


class Bench:
    """One run: where it writes, the request body, and the servers it starts (always stopped)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.stamp = datetime.now(UTC).strftime("%Y-%m-%d-%H%M")
        self.out = ROOT / "reports" / f"asgi-{self.stamp}"
        self.out.mkdir(parents=True, exist_ok=True)
        sample = load_digits_dataset(seed=0).x_test[0].reshape(-1).tolist()
        self.body = orjson.dumps({"data": sample})
        self.script = wrk_script(self.out / "predict.lua", self.body)
        self.lines: list[str] = []

    def server(self, label: str, model: str, backend: str, mode: str, **settings: Any) -> GunicornServer:
        """The model server on the front ``label`` names (harness.model_server), -w ``--workers`` by default."""
        front, worker = FRONTS[label]
        slug = f"{label}-{model}-{backend}-{mode}-{time.monotonic_ns()}".replace(" ", "_")
        return model_server(front, self.args.repo, self.out, slug, ("--no-control-socket", *worker), model=model,
                            backend=backend, mode=mode, **{"workers": self.args.workers, **settings})

    def wrk(self, url: str, connections: int, tag: str, script: Path | None = None) -> WrkResult:
        result = run_wrk(url, script or self.script, connections, self.args.seconds)
        (self.out / f"{tag.replace(' ', '_').replace('/', '-')}-c{connections}.txt").write_text(result.raw)
        print(f"  {tag} c={connections}: {result.requests_per_s:,.0f} req/s, p99 {result.p99_ms:.1f} ms,"
              f" errors {result.errors}", flush=True)
        return result


@contextlib.contextmanager
def plain_server(module: str, app: str, workers: int, log: Path, *extra: str) -> Iterator[str]:
    """A baseline under its own server: ``gunicorn -w N -k sync`` or ``uvicorn --workers N``; stopped after."""
    port = free_port()
    if module == "gunicorn":
        command = ["-m", "gunicorn", "-w", str(workers), "-k", "sync", "-b", f"127.0.0.1:{port}", "-c",
                   "bench/noop.conf.py", "--no-control-socket", app]
    else:
        command = ["-m", "uvicorn", app, "--workers", str(workers), "--port", str(port), "--no-access-log",
                   "--log-level", "warning", *extra]
    env = clean_env(BASELINE_MODEL=str(ROOT / "models" / "digits-torch" / "1" / "model.onnx"), OMP_NUM_THREADS="1")
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, *command], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(requests.RequestException):
                if requests.post(url + "/predict", data=b'{"data": [' + b"0," * 63 + b"0]}", timeout=2,
                                 headers={"Content-Type": "application/json"}).status_code == 200:
                    break
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"{app} did not start: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        time.sleep(1.0)  # the other workers' start-up
        yield url
    finally:
        stop_group(process, 20)


def throughput(bench: Bench) -> None:
    """Single-sample requests at -c32: every configuration on each front, and the baselines."""
    args = bench.args
    rows: list[tuple[str, str, WrkResult]] = []
    configs = CONFIGS[:2] if args.quick else CONFIGS
    for label, module, app in BASELINES[:2] if args.quick else BASELINES:
        print(f"baseline: {label}", flush=True)
        with plain_server(module, app, args.workers, bench.out / f"{app.split(':')[1]}.log") as url:
            rows.append((label, "", bench.wrk(url + "/predict", 32, label)))
    for label, model, backend, mode in configs:
        for front in FRONTS:
            print(f"{label}: {front}", flush=True)
            with bench.server(front, model, backend, mode) as server:
                rows.append((label, front, bench.wrk(server.url + "/predict", 32, f"{label} {front}")))
    threads = {"process": 1, "threaded": 4}
    bench.lines += [
        "## Single samples, wrk -c32", "",
        f"`POST /predict`, one 8x8 digits sample, wrk -t2 -c32 -d{args.seconds}s; -w {args.workers} everywhere."
        " The fronts of a configuration ran back to back; `vs WSGI` is the ratio to the WSGI front of the same"
        " configuration. The baselines make the same ONNX call (digits-torch) with none of the server's checks.", "",
        "| configuration | front | workers x threads | req/s | p50 ms | p99 ms | errors | vs WSGI |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    wsgi = {label: result for label, front, result in rows if front == "WSGI"}
    for label, front, result in rows:
        mode = label.split(" / ")[-1]
        shape = f"{args.workers} x {threads[mode]}" if front else f"{args.workers} x 1"
        ratio = f"{result.requests_per_s / wsgi[label].requests_per_s:.2f}" if front else ""
        bench.lines.append(f"| {label} | {front or '-'} | {shape} | {result.requests_per_s:,.0f} | {result.p50_ms:.2f}"
                           f" | {result.p99_ms:.2f} | {result.errors} | {ratio} |")
    bench.lines.append("")


def batching(bench: Bench) -> None:
    """Batched mode, one sample per request, on the large model: both fronts across concurrency."""
    args = bench.args
    ensure_large_models(args.repo, ["pytorch"])
    levels = (1, 32) if args.quick else (1, 32, 64)
    bench.lines += [
        "## Batched mode, `large` model, one sample per request", "",
        "`digits-large-torch` (about 5.3M weights), `SERVING_MODE=batched` as shipped (16 request threads, or a"
        " pool of 16 on ASGI; max_batch_size 32, max_delay_ms 5).", "",
        "| backend | front | connections | samples/s | p50 ms | p99 ms | errors | vs WSGI |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for backend in ("onnx",) if args.quick else ("onnx", "pytorch"):
        results: dict[tuple[str, int], WrkResult] = {}
        for front in ("WSGI", "ASGI uvicorn-worker"):
            print(f"batched {backend}: {front}", flush=True)
            with bench.server(front, "digits-large-torch", backend, "batched") as server:
                for level in levels:
                    results[(front, level)] = bench.wrk(server.url + "/predict", level, f"batched {backend} {front}")
        for (front, level), result in results.items():
            ratio = result.requests_per_s / results[("WSGI", level)].requests_per_s
            bench.lines.append(f"| {backend} | {front} | {level} | {result.requests_per_s:,.0f} | {result.p50_ms:.2f}"
                               f" | {result.p99_ms:.2f} | {result.errors} | {ratio:.2f} |")
    bench.lines.append("")


def keep_alive_ms(port: int, body: bytes, count: int = 200) -> tuple[float, float]:
    """Median and p99 round trip of sequential POSTs on one keep-alive connection."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    latencies = []
    try:
        for _ in range(count + 1):
            started = time.perf_counter()
            connection.request("POST", "/predict", body=body, headers={"Content-Type": "application/json"})
            answer = connection.getresponse()
            answer.read()
            latencies.append((time.perf_counter() - started) * 1000)
    finally:
        connection.close()
    ordered = sorted(latencies[1:])
    return statistics.median(ordered), ordered[int(len(ordered) * 0.99) - 1]


def keep_alive(bench: Bench) -> None:
    """uvicorn #3149: sequential requests on one keep-alive connection, under gunicorn and uvicorn --workers."""
    bench.lines += [
        "## Keep-alive latency (uvicorn issue #3149)", "",
        "200 sequential `POST /predict` on one keep-alive connection (onnx, threaded, -w 2). A listener without"
        " TCP_NODELAY makes every answer after the first wait for the client's delayed ACK (~40 ms on Linux).", "",
        "| server | median ms | p99 ms |", "| --- | ---: | ---: |",
    ]
    for front in FRONTS:
        with bench.server(front, "digits-torch", "onnx", "threaded") as server:
            median, p99 = keep_alive_ms(server.port, bench.body)
        bench.lines.append(f"| gunicorn, {front} | {median:.2f} | {p99:.2f} |")
    for loop in ("asyncio", "uvloop"):
        with plain_server("uvicorn", "bench.baselines:fastapi_app", 2, bench.out / f"uvicorn-{loop}.log",
                          "--loop", loop) as url:
            median, p99 = keep_alive_ms(int(url.rsplit(":", 1)[1]), bench.body)
        bench.lines.append(f"| uvicorn --workers 2 --loop {loop} (plain FastAPI) | {median:.2f} | {p99:.2f} |")
    bench.lines.append("")


def rss_mb(server: GunicornServer) -> float:
    return sum(p.memory_info().rss for p in psutil.Process(server.pid).children()) / 2**20


def open_idle(port: int, count: int, body: bytes) -> list[socket.socket]:
    """``count`` connections that each got one answer and stay open, idle."""
    request = (b"POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(request)
        sockets.append(sock)
    for sock in sockets:
        sock.recv(65536)
    return sockets


def close_all(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


def connections(bench: Bench) -> None:
    """Idle keep-alive connections per worker, and slow clients against both fronts."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard))
    samples = 2000
    bench.lines += [
        "## Idle keep-alive connections", "",
        "Connections that each got one answer and stay open (SERVING_KEEPALIVE=300), while one client sends"
        f" {samples:,} sequential keep-alive requests; RSS summed over the workers (onnx, threaded). With 2 workers the"
        " measurement alternates without and with the 2,000 idle connections, three times, so that drift on the"
        " shared machine shows as drift, not as a cost of the connections.", "",
        "| front | workers | round | idle connections | client median ms | client p99 ms | RSS MB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    def row(server: GunicornServer, workers: int, round_number: int, level: int) -> None:
        """A client's latency with ``level`` idle connections held (opened a second before)."""
        time.sleep(1.0)
        median, p99 = keep_alive_ms(server.port, bench.body, samples)
        bench.lines.append(f"| ASGI uvicorn-worker | {workers} | {round_number} | {level:,} | {median:.2f}"
                           f" | {p99:.2f} | {rss_mb(server):.0f} |")
        print(f"  {workers} workers, round {round_number}, {level} idle: p99 {p99:.2f} ms,"
              f" {rss_mb(server):.0f} MB", flush=True)

    held: list[socket.socket] = []
    with bench.server("ASGI uvicorn-worker", "digits-torch", "onnx", "threaded", workers=1, keepalive=300) as server:
        try:
            for level in (0, 1000, 2000, 4000):
                held += open_idle(server.port, level - len(held), bench.body)
                row(server, 1, 1, level)
        finally:
            close_all(held)
    with bench.server("ASGI uvicorn-worker", "digits-torch", "onnx", "threaded", workers=2, keepalive=300) as server:
        keep_alive_ms(server.port, bench.body, samples)  # warm both workers
        for round_number in (1, 2, 3):
            for level in (0, 2000):
                held = open_idle(server.port, level, bench.body)
                try:
                    row(server, 2, round_number, level)
                finally:
                    close_all(held)
                time.sleep(1.0)
    bench.lines += [
        "", "## Slow clients", "",
        "32 clients each sending a valid request's body one byte every 100 ms, while one client sends 100"
        " requests on fresh connections with a 3 s timeout (onnx, threaded, -w 2: 2 x 4 request threads on WSGI).",
        "", "| front | answered | timed out | p50 ms | p99 ms |", "| --- | ---: | ---: | ---: | ---: |",
    ]
    for front in ("WSGI", "ASGI uvicorn-worker"):
        with bench.server(front, "digits-torch", "onnx", "threaded") as server:
            bench.lines.append(slow_clients(server, bench.body, front))
    bench.lines.append("")


def slow_clients(server: GunicornServer, body: bytes, front: str) -> str:
    import threading

    stop = threading.Event()

    def trickle() -> None:
        head = (b"POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body))
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(head)
            for byte in body:
                if stop.is_set():
                    return
                sock.sendall(bytes([byte]))
                time.sleep(0.1)

    threads = [threading.Thread(target=trickle, daemon=True) for _ in range(32)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    latencies, timeouts = [], 0
    try:
        for _ in range(100):
            started = time.perf_counter()
            try:
                requests.post(server.url + "/predict", data=body, timeout=3,
                              headers={"Content-Type": "application/json", "Connection": "close"})
                latencies.append((time.perf_counter() - started) * 1000)
            except requests.RequestException:
                timeouts += 1
    finally:
        stop.set()
        for thread in threads:
            thread.join(5)
    ordered = sorted(latencies) or [float("nan")]
    p99 = ordered[max(0, int(len(ordered) * 0.99) - 1)]
    print(f"  slow clients, {front}: {len(latencies)} answered, {timeouts} timed out", flush=True)
    return f"| {front} | {len(latencies)} | {timeouts} | {statistics.median(ordered):.2f} | {p99:.2f} |"


def streaming(bench: Bench) -> None:
    """Time to the first and the last line of a 64-sample stream, against one /predict of the same 64."""
    sample = orjson.loads(bench.body)["data"]
    body = orjson.dumps({"data": [sample] * 64})
    bench.lines += [
        "## Streaming 64 samples", "",
        "`POST /predict/stream` with 64 samples on `digits-large-torch` (onnx, threaded, -w 2), medians of 20;"
        " `/predict` answers the same 64 samples at once.", "",
        "| front | first line ms | last line ms | /predict ms |", "| --- | ---: | ---: | ---: |",
    ]
    for front in ("WSGI", "ASGI uvicorn-worker"):
        with bench.server(front, "digits-large-torch", "onnx", "threaded") as server:
            firsts, lasts, wholes = [], [], []
            for _ in range(20):
                started = time.perf_counter()
                with requests.post(server.url + "/predict/stream", data=body, stream=True, timeout=10,
                                   headers={"Content-Type": "application/json"}) as answer:
                    first = None
                    for _chunk in answer.iter_content(chunk_size=None):
                        first = first or time.perf_counter() - started
                lasts.append((time.perf_counter() - started) * 1000)
                firsts.append((first or 0.0) * 1000)
                started = time.perf_counter()
                requests.post(server.url + "/predict", data=body, timeout=10,
                              headers={"Content-Type": "application/json"})
                wholes.append((time.perf_counter() - started) * 1000)
        bench.lines.append(f"| {front} | {statistics.median(firsts):.2f} | {statistics.median(lasts):.2f}"
                           f" | {statistics.median(wholes):.2f} |")
    bench.lines.append("")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=8, help="wrk duration per run")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers for every server")
    parser.add_argument("--repo", type=Path, default=ROOT / "models", help="model repository")
    parser.add_argument("--quick", action="store_true", help="two configurations, fewer levels: a dry run")
    parser.add_argument("--only", default="throughput,batching,keep_alive,connections,streaming",
                        help="comma-separated parts to run")
    args = parser.parse_args()
    bench = Bench(args)
    started = time.monotonic()
    parts = {"throughput": throughput, "batching": batching, "keep_alive": keep_alive, "connections": connections,
             "streaming": streaming}
    for name in args.only.split(","):
        print(f"== {name}", flush=True)
        parts[name](bench)
    elapsed = time.monotonic() - started
    header = [
        f"# WSGI against ASGI, {bench.stamp} UTC", "",
        f"`python -m bench.asgi{' --quick' if args.quick else ''}`, {len(os.sched_getaffinity(0))} cores shared by"
        f" the servers, wrk and the Python clients (and other test runs on this machine), {elapsed:.0f} s in all."
        " Compare numbers within this report; absolute req/s drift by 10-20% between runs.", "",
    ]
    report = "\n".join(header + bench.lines) + "\n"
    path = ROOT / "reports" / f"asgi-{bench.stamp}.md"
    save_report(path, report)


if __name__ == "__main__":
    main()
