"""Where the CPU goes: the model pool against batched mode on the large model, per request and per process.

    python -m bench.pool_cpu [--seconds 6] [--concurrency 32,64] [--backends onnx,pytorch] [--rounds 2]
                             [--model M]
                             [--servers NAME,...] (batched, batched-pinned, pool, pool-pinned, pool-before,
                              pool-no-priority, pool-first, pool-w4)

Issue 24 asks the pool on ``digits-large-torch`` to serve at least batched mode's samples/s at 32-64 connections.
On a machine whose cores are all busy (the load generator included), samples/s = busy cores / CPU per request,
so this measures the CPU each request costs in every process. For each backend and concurrency, servers as shipped
(``-w 2``, one 8x8 sample per request, wrk on ``POST /predict``) alternate:

- batched mode, the model in every worker (``SERVING_MODE=batched``), as shipped and with its workers pinned to
  their cores (``SERVING_CPU_AFFINITY=true``);
- the pool: threaded HTTP workers and one pool process (``SERVING_MODEL_POOL=1``), as shipped and with the HTTP
  workers pinned (the pool's process is never pinned);
- the pool as it was before ``SERVING_POOL_PRIORITY`` (``pool-before``: no priority of its own and a math thread
  per core), with today's math threads but no priority (``pool-no-priority``), put first whatever the model
  (``pool-first``), and with 4 HTTP workers (``pool-w4``).

``--model`` serves another model of the repository (``digits-tf`` with ``--backends tensorflow``: a light one).

``--servers`` picks which of them run (by the names above); the first is the others' baseline.

During ``--seconds`` of wrk (after 1 s of it), the CPU time (user + system, ``/proc/<pid>/stat``) of the master,
the HTTP workers, the pool's arbiter and its processes, the machine's busy share (``/proc/stat``), the mean
batch of the model's calls (``serving_batch_size``'s sum over its count on ``/metrics``: batched mode's batches,
or the pool processes' own), and how long the pool's busiest thread waited for a core while runnable
(``/proc/<pid>/task/<tid>/schedstat``). Writes ``reports/pool-cpu-<stamp>.md``.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests
from prometheus_client.parser import text_string_to_metric_families

from bench.batching import ensure_large_models
from bench.harness import ROOT, digits_script, mnist_script, model_server, run_wrk, save_report
from serving.observability.memory import tree_memory

TICK = os.sysconf("SC_CLK_TCK")
CORES = len(os.sched_getaffinity(0))
SERVERS = {"batched": ("batched, model in every worker", {"mode": "batched"}),
           "batched-pinned": ("batched, workers pinned", {"mode": "batched", "cpu_affinity": "true"}),
           "pool": ("pool", {"mode": "threaded", "model_pool": 1}),
           "pool-pinned": ("pool, HTTP workers pinned", {"mode": "threaded", "model_pool": 1, "cpu_affinity": "true"}),
           # the pool before SERVING_POOL_PRIORITY: every core's math thread in its process, no priority of its own
           "pool-before": ("pool, no priority, a math thread per core",
                           {"mode": "threaded", "model_pool": 1, "pool_priority": 0, "math_threads": CORES}),
           "pool-no-priority": ("pool, no priority", {"mode": "threaded", "model_pool": 1, "pool_priority": 0}),
           "pool-first": ("pool, put first whatever the model", {"mode": "threaded", "model_pool": 1,
                                                                  "pool_priority": 19}),
           "pool-w4": ("pool, -w 4", {"mode": "threaded", "model_pool": 1, "workers": 4})}


def cpu_seconds(pid: int) -> float:
    """User + system seconds of ``pid`` and all its threads so far (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def machine() -> tuple[float, float]:
    """(busy, total) seconds of every core so far, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return (sum(values) - idle) / TICK, sum(values) / TICK


def batches(url: str) -> tuple[float, float]:
    """``serving_batch_size``'s (sum, count) over every model on /metrics."""
    found = {"serving_batch_size_sum": 0.0, "serving_batch_size_count": 0.0}
    for family in text_string_to_metric_families(requests.get(url + "/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name in found:
                found[sample.name] += sample.value
    return found["serving_batch_size_sum"], found["serving_batch_size_count"]


def snapshot(master: int) -> dict[str, float]:
    """CPU seconds by role of the server's processes."""
    by_role: dict[str, float] = {}
    for process in tree_memory(master):
        by_role[process.role] = by_role.get(process.role, 0.0) + cpu_seconds(process.pid)
    return by_role


def pool_threads(master: int) -> dict[int, tuple[int, int]]:
    """(ns on a core, ns runnable but waiting for one) of every thread of the pool's processes."""
    found = {}
    for process in tree_memory(master):
        if process.role != "pool":
            continue
        for task in Path(f"/proc/{process.pid}/task").iterdir():
            try:
                ran, waited, _slices = (int(v) for v in (task / "schedstat").read_text().split())
            except (OSError, ValueError):
                continue
            found[int(task.name)] = (ran, waited)
    return found


def busiest_wait(first: dict[int, tuple[int, int]], last: dict[int, tuple[int, int]], elapsed: float
                 ) -> tuple[float, float]:
    """(share of the time on a core, share waiting for one) of the pool thread that ran most."""
    deltas = [(last[t][0] - first[t][0], last[t][1] - first[t][1]) for t in last if t in first]
    if not deltas:
        return float("nan"), float("nan")
    ran, waited = max(deltas)
    return ran / 1e9 / elapsed, waited / 1e9 / elapsed


def measure(server: Any, script: Path, level: int, seconds: int) -> dict[str, Any]:
    """wrk for 1 + ``seconds`` s; the CPU and batches of the last ``seconds``."""
    result: dict[str, Any] = {}
    driver = threading.Thread(target=lambda: result.update(wrk=run_wrk(server.url + "/predict", script, level,
                                                                       seconds + 1)))
    driver.start()
    time.sleep(1)
    first, busy0, batch0 = snapshot(server.pid), machine(), batches(server.url)
    threads0 = pool_threads(server.pid)
    started = time.monotonic()
    time.sleep(seconds - 0.2)
    last, busy1, batch1 = snapshot(server.pid), machine(), batches(server.url)
    threads1 = pool_threads(server.pid)
    elapsed = time.monotonic() - started
    driver.join()
    roles = {role: last.get(role, 0.0) - first.get(role, 0.0) for role in last}
    count = batch1[1] - batch0[1]
    return {"wrk": result["wrk"], "roles": roles, "elapsed": elapsed,
            "busy": (busy1[0] - busy0[0]) / (busy1[1] - busy0[1]),
            "pool_thread": busiest_wait(threads0, threads1, elapsed),
            "batch": (batch1[0] - batch0[0]) / count if count else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--concurrency", default="32,64")
    parser.add_argument("--backends", default="onnx,pytorch")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--servers", default="batched,batched-pinned,pool,pool-pinned",
                        help=f"which of {', '.join(SERVERS)}; the first is the baseline")
    parser.add_argument("--model", default="digits-large-torch",
                        help="the model served: one 8x8 sample, or one real 28x28 t10k digit for an mnist-* model")
    parser.add_argument("--repo", type=Path, default=ROOT / "models")
    parser.add_argument("--reports", type=Path, default=ROOT / "reports")
    args = parser.parse_args()
    args.configs = [SERVERS[name] for name in args.servers.split(",")]
    stamp = datetime.now(UTC).strftime("%Y-%m-%d-%H%M")
    out_dir = args.reports / f"pool-cpu-{stamp}"
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.model == "digits-large-torch":
        ensure_large_models(args.repo, ["pytorch"])
    script = mnist_script(out_dir) if args.model.startswith("mnist") else digits_script(out_dir)
    rows = []
    for round_number in range(1, args.rounds + 1):
        for backend in args.backends.split(","):
            for level in (int(c) for c in args.concurrency.split(",")):
                for name, (label, settings) in zip(args.servers.split(","), args.configs, strict=True):
                    slug = f"{backend}-{name}-{level}-r{round_number}"
                    settings = {"workers": 2, **settings}
                    with model_server("wsgi", args.repo, out_dir, slug, ["--no-control-socket"],
                                      model=args.model, backend=backend, **settings) as server:
                        run_wrk(server.url + "/predict", script, level, 2)  # warm: every worker and pool process
                        found = measure(server, script, level, args.seconds)
                    rows.append((round_number, backend, level, label, found))
                    rate = found["wrk"].requests_per_s
                    server_cpu = sum(found["roles"].values())
                    print(f"r{round_number} {backend} c{level} {label}: {rate:,.0f} samples/s, server CPU"
                          f" {server_cpu / found['elapsed'] / rate * 1e6:,.0f} us per request, machine busy"
                          f" {found['busy']:.0%}, mean batch {found['batch']:.1f}, pool thread on a core / waiting"
                          f" for one {found['pool_thread'][0]:.0%} / {found['pool_thread'][1]:.0%}", flush=True)
    path = args.reports / f"pool-cpu-{stamp}.md"
    save_report(path, render(args, rows, stamp))


def on_core(found: dict[str, Any]) -> str:
    """The pool's busiest thread: its share of the time on a core and waiting for one."""
    ran, waited = found["pool_thread"]
    return "-" if ran != ran else f"{ran:.0%}, {waited:.0%}"  # NaN: no pool


def render(args: argparse.Namespace, rows: list[tuple[Any, ...]], stamp: str) -> str:
    lines = [f"# The model pool against batched mode: CPU per request, {stamp} UTC", "",
             f"`python -m bench.pool_cpu --seconds {args.seconds} --concurrency {args.concurrency} --backends"
             f" {args.backends} --rounds {args.rounds} --servers {args.servers} --model {args.model}` on"
             f" {os.cpu_count()} cores: `{args.model}`, `-w 2` unless the row says otherwise,"
             f" one {'real 28x28 t10k digit' if args.model.startswith('mnist') else '8x8 sample'} per request,"
             " wrk on POST /predict, the servers"
             " alternating. CPU is user + system time of each process and all its threads over the measured"
             " window, divided by the requests answered in it;"
             " \"rest\" is every other busy second of the machine (wrk, the kernel's softirqs) per request. The mean"
             " batch is the model's calls' (serving_batch_size: batched mode's batches, or the pool processes').", "",
             "| round | backend | connections | serving | samples/s | machine busy | mean batch | HTTP workers, us |"
             " pool, us | master and arbiter, us | server, us | rest, us | pool thread: on a core, waiting for one |",
             "| ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    cores = os.cpu_count() or 1
    for round_number, backend, level, label, found in rows:
        rate = found["wrk"].requests_per_s
        per = {role: seconds / found["elapsed"] / rate * 1e6 for role, seconds in found["roles"].items()}
        server = sum(per.values())
        rest = found["busy"] * cores / rate * 1e6 - server
        batch = f"{found['batch']:.1f}"
        lines.append(f"| {round_number} | {backend} | {level} | {label} | {rate:,.0f} | {found['busy']:.0%} |"
                     f" {batch} | {per.get('worker', 0):,.0f} | {per.get('pool', 0):,.0f} |"
                     f" {per.get('master', 0) + per.get('pool-arbiter', 0):,.0f} | {server:,.0f} | {rest:,.0f} |"
                     f" {on_core(found)} |")
    lines += ["", "## Means over the rounds", "",
              f"| backend | connections | serving | samples/s | / {args.configs[0][0]} | server CPU per request, us"
              f" | / {args.configs[0][0]} |",
              "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for backend in args.backends.split(","):
        for level in (int(c) for c in args.concurrency.split(",")):
            means = {}
            for label, _ in args.configs:
                found = [f for _, b, lev, lab, f in rows if (b, lev, lab) == (backend, level, label)]
                rate = sum(f["wrk"].requests_per_s for f in found) / len(found)
                cpu = sum(sum(f["roles"].values()) / f["elapsed"] / f["wrk"].requests_per_s * 1e6
                          for f in found) / len(found)
                means[label] = (rate, cpu)
            base_rate, base_cpu = means[args.configs[0][0]]
            for label, (rate, cpu) in means.items():
                lines.append(f"| {backend} | {level} | {label} | {rate:,.0f} | {rate / base_rate:.2f} | {cpu:,.0f} |"
                             f" {cpu / base_cpu:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
