"""The model pool against models in every worker: per-call overhead, throughput on the large model, memory.

    python -m bench.pool [--seconds 8] [--concurrency 32,64] [--calls 5000] [--parts overhead,throughput,...]

1. Per-call overhead on one 28x28 sample: the ONNX export of ``mnist28-torch`` (``bench.mnist_shaped``) is
   called ``--calls`` times in this process, then through a real pool process (a ``PoolServer`` in a forked
   child, the same backend, a ``PoolClient`` here: Unix socket plus shared memory); the overhead is the
   difference of the medians.
2. Throughput on ``digits-large-torch`` (5.3M weights) at each concurrency, one sample per request: batched
   mode in every worker (``-w 2``, as shipped) against the pool (``-w 2`` threaded HTTP workers, one pool
   process) as shipped and as it was before ``SERVING_POOL_PRIORITY`` (no priority, a math thread per core),
   for the pytorch and onnx backends, wrk on ``POST /predict``.
3. TensorFlow's default in process mode (the pool, as shipped and as before) against TensorFlow in every worker.
4. Total PSS of the pool server at ``-w 1`` and ``-w 8`` HTTP workers.

``--parts`` runs some of them: ``overhead``, ``throughput``, ``tensorflow``, ``memory`` (all by default). Writes
``reports/pool-<stamp>.md``.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from bench.batching import ensure_large_models
from bench.harness import ROOT, digits_script, model_server, run_wrk, save_report
from bench.mnist_shaped import NAME as MNIST28
from bench.mnist_shaped import ensure_model
from serving.backends import backend_class
from serving.host.model_pool import PoolServer
from serving.observability.memory import tree_memory
from serving.runtime.model_pool import PoolClient
from serving.runtime.pool_wire import mapping_size
from serving.store.repository import ModelMetadata, ModelRepository

OVERHEAD_TARGET_US = 60.0
PARTS = ("overhead", "throughput", "tensorflow", "memory")
MEMORY_RATIO_TARGET = 1.5


class Zeros:
    """A model that does no work: what is left of a pool call is the transport."""

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return np.zeros((len(batch), 10), np.float32)


def _timed(call, sample: np.ndarray, calls: int) -> float:
    """Median microseconds of ``call(sample)`` after a warm-up."""
    for _ in range(200):
        call(sample)
    times = []
    for _ in range(calls):
        started = time.perf_counter_ns()
        call(sample)
        times.append(time.perf_counter_ns() - started)
    return statistics.median(times) / 1000


def socket_floor(calls: int, cores: tuple[int, int] | None) -> float:
    """Median microseconds of a bare 24-byte round trip to another process over a Unix socket."""
    mine, theirs = socket.socketpair()
    child = os.fork()
    if child == 0:
        try:
            if cores:
                os.sched_setaffinity(0, {cores[1]})
            mine.close()
            while data := theirs.recv(64):
                theirs.send(data)
        finally:
            os._exit(0)
    theirs.close()
    before = os.sched_getaffinity(0)
    if cores:
        os.sched_setaffinity(0, {cores[0]})
    try:
        return _timed(lambda _: (mine.send(b"x" * 24), mine.recv(64)), np.zeros(1), calls)
    finally:
        os.sched_setaffinity(0, before)
        mine.close()
        os.waitpid(child, 0)


def pool_call(meta: ModelMetadata | None, calls: int, out_dir: Path, cores: tuple[int, int] | None) -> float:
    """Median microseconds per call of one 28x28 sample through a real pool process (a forked
    ``PoolServer``: its own backend, Unix socket plus shared memory); ``meta`` None = the no-work model."""
    directory = out_dir / "pool-sockets"
    directory.mkdir(exist_ok=True)
    key = f"{MNIST28}:1"
    child = os.fork()
    if child == 0:  # the pool process, served until the parent kills it
        try:
            if cores:
                os.sched_setaffinity(0, {cores[1]})
            if meta is None:
                backend: Any = Zeros()
            else:
                backend = backend_class("onnx")(meta, 1)
                backend.load()
            server = PoolServer({key: backend}, directory / "1.sock", 32, 64)
            server.start()  # its metrics thread too, as in a real pool process
            server.thread.join()
        finally:
            os._exit(0)
    before = os.sched_getaffinity(0)
    if cores:
        os.sched_setaffinity(0, {cores[0]})
    try:
        client = PoolClient(directory, mapping_size(64, 28 * 28), 5.0)
        client.wait_for(key, 30)
        return _timed(lambda batch: client.call(key, batch), np.zeros((1, 28, 28), np.float32), calls)
    finally:
        client.close()
        os.sched_setaffinity(0, before)
        os.kill(child, 9)
        os.waitpid(child, 0)


def per_call(repo: Path, calls: int, out_dir: Path) -> list[tuple[str, float, float, float, float]]:
    """Per placement (any core, other core, same core): socket floor, no-work pool call, model in this
    process, model through the pool; medians in microseconds."""
    meta = ModelRepository(repo).resolve(MNIST28)
    sample = np.asarray(meta.sample()[0], dtype=np.float32).reshape(1, *meta.input_shape)
    local = backend_class("onnx")(meta, 1)
    local.load()
    rows = []
    placements: list[tuple[str, tuple[int, int] | None]] = [("as scheduled", None)]
    if len(os.sched_getaffinity(0)) > 1:
        first, second = sorted(os.sched_getaffinity(0))[:2]
        placements += [("other cores", (first, second)), ("same core", (first, first))]
    for label, cores in placements:
        before = os.sched_getaffinity(0)
        if cores:
            os.sched_setaffinity(0, {cores[0]})
        in_process = _timed(local.predict, sample, calls)
        os.sched_setaffinity(0, before)
        rows.append((label, socket_floor(calls, cores), pool_call(None, calls, out_dir, cores), in_process,
                     pool_call(meta, calls, out_dir, cores)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--concurrency", default="32,64")
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--backends", default="pytorch,onnx")
    parser.add_argument("--repo", type=Path, default=ROOT / "models")
    parser.add_argument("--reports", type=Path, default=ROOT / "reports")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"which of {', '.join(PARTS)}")
    args = parser.parse_args()
    parts = args.parts.split(",")
    if unknown := set(parts) - set(PARTS):
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    stamp = datetime.now(UTC).strftime("%Y-%m-%d-%H%M")
    out_dir = args.reports / f"pool-{stamp}"
    out_dir.mkdir(parents=True, exist_ok=True)
    ensure_model(args.repo)
    ensure_large_models(args.repo, ["pytorch"])

    lines = [f"# Model pool, {stamp} UTC", "",
             f"`python -m bench.pool --parts {args.parts}` on {os.cpu_count()} cores."]
    if "overhead" in parts:
        lines += overhead_section(args, out_dir)
    script = digits_script(out_dir)
    if "throughput" in parts:
        lines += throughput_section(args, out_dir, script)
    if "tensorflow" in parts:
        lines += render_tensorflow_default(tensorflow_default(args, out_dir, script), args)
    if "memory" in parts:
        lines += memory_section(args, out_dir, script)
    save_report(args.reports / f"pool-{stamp}.md", "\n".join(lines) + "\n")


def overhead_section(args: argparse.Namespace, out_dir: Path) -> list[str]:
    calls = per_call(args.repo, args.calls, out_dir)
    for row in calls:
        print("per call (us): {} floor {:.1f}, no-work pool {:.1f}, in process {:.1f}, pool {:.1f}".format(*row),
              flush=True)
    lines = ["", "## Per-call overhead, one 28x28 sample", "",
             f"The ONNX export of `{MNIST28}`, {args.calls:,} calls each, medians in microseconds, with the client"
             " and the pool process where the scheduler puts them, pinned to two cores, and pinned to one. The"
             " floor is a bare 24-byte round trip to another process over a Unix socket; the no-work pool call"
             " runs a model that does nothing (the transport alone). Overhead = through the pool - in process"
             f" (target <= {OVERHEAD_TARGET_US:.0f}).", "",
             "| placement | socket floor | no-work pool call | model in process | model through the pool |"
             " overhead |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for label, floor, transport, in_process, pooled in calls:
        lines.append(f"| {label} | {floor:.1f} | {transport:.1f} | {in_process:.1f} | {pooled:.1f} |"
                     f" **{pooled - in_process:.1f}** |")
    return lines


def throughput_section(args: argparse.Namespace, out_dir: Path, script: Path) -> list[str]:
    rows = []
    for backend in args.backends.split(","):
        for index, (label, settings) in enumerate(SERVERS):
            for level in (int(c) for c in args.concurrency.split(",")):
                slug = f"{backend}-{index}-{level}"
                with model_server("wsgi", args.repo, out_dir, slug, ["--no-control-socket"],
                                  model="digits-large-torch", backend=backend, workers=2, **settings) as server:
                    result = run_wrk(server.url + "/predict", script, level, args.seconds)
                    memory = sum(p.pss for p in tree_memory(server.pid)) / 1e6
                rows.append((backend, label, level, result, memory))
                print(f"{backend} {label} c={level}: {result.requests_per_s:,.0f} samples/s,"
                      f" p99 {result.p99_ms:.1f} ms, errors {result.errors}, {memory:,.0f} MB", flush=True)
    lines = ["", "## Throughput, `digits-large-torch`, one sample per request", "",
             f"wrk -d{args.seconds}s, `-w 2`; samples/s = requests/s.", "",
             "| backend | serving | connections | samples/s | p50 | p99 | errors | total PSS |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for backend, label, level, result, memory in rows:
        lines.append(f"| {backend} | {label} | {level} | {result.requests_per_s:,.0f} | {result.p50_ms:.2f} ms |"
                     f" {result.p99_ms:.2f} ms | {result.errors} | {memory:,.0f} MB |")
    lines += ["", "| backend | connections | pool / batched samples/s |", "| --- | ---: | ---: |"]
    for backend, label, level, result, _ in rows:
        if label.startswith("pool"):
            base = next(r for b, lab, lev, r, _ in rows if b == backend and lev == level and lab.startswith("batched"))
            lines.append(f"| {backend} | {level} | {result.requests_per_s / base.requests_per_s:.2f} |")
    return lines


def memory_section(args: argparse.Namespace, out_dir: Path, script: Path) -> list[str]:
    sizes = {}
    for workers in (1, 8):
        with model_server("wsgi", args.repo, out_dir, f"memory-w{workers}", ["--no-control-socket"],
                          model="digits-large-torch", backend="pytorch", workers=workers, mode="threaded",
                          model_pool=1) as server:
            run_wrk(server.url + "/predict", script, 2 * workers, 2)
            time.sleep(1)
            sizes[workers] = sum(p.pss for p in tree_memory(server.pid)) / 1e6

    ratio = sizes[8] / sizes[1]
    return ["", "## Memory of the pool server against HTTP workers", "",
            "pytorch, `digits-large-torch`, threaded HTTP workers, one pool process, after 2 s of wrk.", "",
            "| HTTP workers | total PSS |", "| ---: | ---: |",
            f"| 1 | {sizes[1]:,.0f} MB |", f"| 8 | {sizes[8]:,.0f} MB |", "",
            f"-w 8 / -w 1: **{ratio:.2f}** (target <= {MEMORY_RATIO_TARGET}:"
            f" {'met' if ratio <= MEMORY_RATIO_TARGET else 'not met'})."]


SERVERS = (("batched, model in every worker", {"mode": "batched"}),
           ("pool (threaded HTTP workers)", {"mode": "threaded", "model_pool": 1}),
           # the pool before SERVING_POOL_PRIORITY: no priority, a math thread per core
           ("pool, no priority, a math thread per core", {"mode": "threaded", "model_pool": 1, "pool_priority": 0,
                                                          "math_threads": len(os.sched_getaffinity(0))}))
TF_DEFAULTS = (("in every worker (SERVING_MODEL_POOL=0)", {"model_pool": 0}),
               ("the pool (SERVING_MODEL_POOL=auto, the default)", {}),
               # the pool before SERVING_POOL_PRIORITY: no priority, a math thread per core
               ("the pool, no priority, a math thread per core", {"pool_priority": 0,
                                                                   "math_threads": len(os.sched_getaffinity(0))}))


def tensorflow_default(args: argparse.Namespace, out_dir: Path, script: Path) -> list[tuple[Any, ...]]:
    """TensorFlow's default against its former one, as shipped (process mode, no other setting), alternating:
    ``digits-tf``, one 8x8 sample per request, wrk at 32 connections and at 1, ``-w 2`` and ``-w 4``."""
    rows = []
    for round_number in (1, 2):
        for workers in (2, 4):
            for label, settings in TF_DEFAULTS:
                slug = f"tf-default-{label[:12].replace(' ', '-')}-{len(settings)}-w{workers}-r{round_number}"
                with model_server("wsgi", args.repo, out_dir, slug, ["--no-control-socket"], model="digits-tf",
                                  backend="tensorflow", workers=workers, **settings) as server:
                    run_wrk(server.url + "/predict", script, 8, 2)  # every worker and the pool warm
                    many = run_wrk(server.url + "/predict", script, 32, args.seconds)
                    one = run_wrk(server.url + "/predict", script, 1, args.seconds, threads=1)
                    memory = sum(p.pss for p in tree_memory(server.pid)) / 1e6
                rows.append((round_number, workers, label, many, one, memory))
                print(f"tensorflow {label} -w {workers}: c32 {many.requests_per_s:,.0f} req/s,"
                      f" c1 p50 {one.p50_ms:.2f} ms, {memory:,.0f} MB", flush=True)
    return rows


def render_tensorflow_default(rows: list[tuple[Any, ...]], args: argparse.Namespace) -> list[str]:
    lines = ["", "## TensorFlow's default: the pool against a model in every worker", "",
             f"`digits-tf`, process mode as shipped (the pool's HTTP workers are threaded), one 8x8 sample per"
             f" request, wrk -d{args.seconds}s at 32 connections and at 1, two rounds alternating.", "",
             "| round | -w | TensorFlow runs | c32 req/s | c32 p99 | c1 req/s | c1 p50 | errors | total PSS |",
             "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for round_number, workers, label, many, one, memory in rows:
        lines.append(f"| {round_number} | {workers} | {label} | {many.requests_per_s:,.0f} | {many.p99_ms:.2f} ms |"
                     f" {one.requests_per_s:,.0f} | {one.p50_ms:.2f} ms | {many.errors + one.errors} |"
                     f" {memory:,.0f} MB |")
    lines += ["", "| -w | pool / every worker, c32 req/s | c1 p50 difference | total PSS |",
              "| ---: | ---: | ---: | ---: |"]
    for workers in sorted({row[1] for row in rows}):
        own = [row for row in rows if row[1] == workers and "every worker" in row[2]]
        pool = [row for row in rows if row[1] == workers and "pool" in row[2]]
        ratio = sum(r[3].requests_per_s for r in pool) / sum(r[3].requests_per_s for r in own)
        delay = (sum(r[4].p50_ms for r in pool) - sum(r[4].p50_ms for r in own)) / len(pool)
        lines.append(f"| {workers} | {ratio:.2f} | {delay:+.2f} ms | {pool[0][5]:,.0f} / {own[0][5]:,.0f} MB |")
    return lines


if __name__ == "__main__":
    main()
