"""Fork safety under fire: many requests per backend while workers are SIGKILLed and the master reloads.

For each backend (and the model pool) a server as shipped (shared memory on, -w 2) answers ``--requests``
single-sample predictions from ``--clients`` threads; every ``--kill-every`` requests one worker (and, for the
pool, one pool process in turn) is SIGKILLed, and half-way the master gets a SIGHUP. Every answer must be a 200
with the same prediction, and none may take longer than ``--hang-s``. A request whose connection the kill cut
(reset, refused) is retried once, as a proxy in front would; a 503 (a pool process restarting) is retried after
its Retry-After. Both are counted. The test suite runs a short version (tests/server/test_fork_safety.py); this
script runs the long one and writes ``reports/fork-soak-<stamp>.md``:

    python -m bench.fork_soak                      # 100,000 requests per backend, a kill every 10,000
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import orjson
import requests

from bench.harness import ROOT, model_server, save_report
from serving.observability.memory import tree_memory

MODELS = {"tensorflow": "digits-tf", "pytorch": "digits-torch", "onnx": "digits-tf"}


@dataclass
class SoakResult:
    """What one run saw."""

    requests: int = 0
    ok: int = 0
    failed: list[str] = field(default_factory=list)
    retried_connection: int = 0
    retried_503: int = 0
    kills: int = 0
    reloads: int = 0
    slowest_s: float = 0.0
    seconds: float = 0.0


def drive(url: str, body: bytes, master: int, total: int, kill_every: int, hup_at: int | None, clients: int = 4,
          hang_s: float = 15.0, kill_roles: tuple[str, ...] = ("worker",),
          on_progress: Callable[[int], None] | None = None) -> SoakResult:
    """Send ``total`` predictions to ``url`` from ``clients`` threads, killing and reloading as it goes."""
    result = SoakResult()
    lock = threading.Lock()
    counter = iter(range(total))
    expected: list[int] = []
    started = time.monotonic()
    kill_turn = [0]

    def disrupt(index: int) -> None:
        if index and index % kill_every == 0:
            role = kill_roles[kill_turn[0] % len(kill_roles)]
            kill_turn[0] += 1
            victims = [p.pid for p in tree_memory(master) if p.role == role]
            if victims:
                os.kill(victims[0], signal.SIGKILL)
                result.kills += 1
        if hup_at is not None and index == hup_at:
            os.kill(master, signal.SIGHUP)
            result.reloads += 1

    def one(session: requests.Session) -> None:
        retries_left, overloads_left = 1, 20
        t0 = time.monotonic()
        while True:
            try:
                answer = session.post(url, data=body, headers={"Content-Type": "application/json"},
                                      timeout=hang_s)
            except requests.Timeout:
                with lock:
                    result.failed.append(f"no answer within {hang_s} s")
                return
            except requests.RequestException as exc:  # reset, refused, or cut mid-answer by the kill
                if retries_left:
                    retries_left -= 1
                    with lock:
                        result.retried_connection += 1
                    time.sleep(0.05)
                    continue
                with lock:
                    result.failed.append(f"connection failed twice: {exc!r}"[:200])
                return
            if answer.status_code == 503 and overloads_left:
                overloads_left -= 1
                with lock:
                    result.retried_503 += 1
                time.sleep(float(answer.headers.get("Retry-After", "1")) / 5)
                continue
            break
        elapsed = time.monotonic() - t0
        with lock:
            result.slowest_s = max(result.slowest_s, elapsed)
            if answer.status_code != 200:
                result.failed.append(f"{answer.status_code}: {answer.text[:160]}")
                return
            probabilities = answer.json()["prediction"][0]
            label = max(range(len(probabilities)), key=probabilities.__getitem__)
            if not expected:
                expected.append(label)
            if label != expected[0]:
                result.failed.append(f"predicted {label}, not {expected[0]}")
                return
            result.ok += 1

    def client() -> None:
        session = requests.Session()
        while True:
            with lock:
                index = next(counter, None)
                if index is not None:
                    result.requests += 1
            if index is None:
                return
            disrupt(index)
            try:
                one(session)
            except Exception as exc:  # an answer that is not the JSON it should be
                with lock:
                    result.failed.append(f"unexpected answer: {exc!r}"[:200])
            if on_progress is not None and index % 10_000 == 0:
                on_progress(index)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.seconds = time.monotonic() - started
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--kill-every", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--backends", default="tensorflow,pytorch,onnx,pool")
    parser.add_argument("--repo", type=Path, default=ROOT / "models")
    parser.add_argument("--reports", type=Path, default=ROOT / "reports")
    args = parser.parse_args()
    stamp = datetime.now(UTC).strftime("%Y-%m-%d-%H%M")
    out_dir = args.reports / f"fork-soak-{stamp}"
    out_dir.mkdir(parents=True, exist_ok=True)
    sample = orjson.loads((args.repo / "digits-tf" / "1" / "sample.json").read_bytes())
    body = orjson.dumps({"data": sample["data"]})
    lines = [f"# Fork safety soak, {stamp} UTC", "",
             f"`python -m bench.fork_soak`: {args.requests:,} single-sample `POST /predict` per backend from"
             f" {args.clients} clients, `-w 2`, `SERVING_SHARE_MEMORY` on; a worker SIGKILLed every"
             f" {args.kill_every:,} requests (the pool row: a worker and a pool process in turn), one SIGHUP"
             " half-way. A request cut by a kill is retried once; a 503 after its Retry-After.", "",
             "| backend | requests | 200 | failed | kills | reloads | connection retries | 503 retries | slowest |"
             " req/s |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name in args.backends.split(","):
        backend, settings, roles = name, {"model_pool": 0}, ("worker",)
        if name == "pool":
            backend, settings, roles = "tensorflow", {"model_pool": 1}, ("worker", "pool")
        print(f"{name} ...", flush=True)
        with model_server("wsgi", args.repo, out_dir, name, ["--no-control-socket"], model=MODELS[backend],
                          backend=backend, mode="process", workers=2, **settings) as server:
            result = drive(server.url + "/predict", body, server.pid, args.requests, args.kill_every,
                           args.requests // 2, args.clients, kill_roles=roles,
                           on_progress=lambda i: print(f"  {i:,}", flush=True))
        lines.append(f"| {name} | {result.requests:,} | {result.ok:,} | {len(result.failed)} | {result.kills} |"
                     f" {result.reloads} | {result.retried_connection} | {result.retried_503} |"
                     f" {result.slowest_s:.2f} s | {result.requests / result.seconds:,.0f} |")
        for failure in sorted(set(result.failed))[:5]:
            lines.append(f"|  | failure: {failure} |  |  |  |  |  |  |  |  |")
        print(lines[-1], flush=True)
    report = "\n".join(lines) + "\n"
    path = args.reports / f"fork-soak-{stamp}.md"
    save_report(path, report)


if __name__ == "__main__":
    main()
