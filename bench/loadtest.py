"""Which mode should I run? A bounded matrix of real servers under locust, with a readable report.

    make loadtest                                   # the matrix on both fronts and a step ramp (~10 minutes)
    python -m bench.loadtest --quick                # four configurations, one on ASGI: under 3 minutes
    python -m bench.loadtest --configs tf-threaded,onnx-batched,onnx-batched-asgi --users 32 --duration 30
    python -m bench.loadtest --step-ramp onnx-batched   # also find that configuration's saturation point

Every configuration runs on the WSGI front (``tf-threaded``) and, right after it, on the ASGI front
(``tf-threaded-asgi``: SERVING_FRONT=asgi, ``asgi_server:app``; same model, mode, workers and threads).
For each configuration: start ``gunicorn -c gunicorn.conf.py`` with the front's app on a free loopback
port, wait until every worker is ready, run ``locust --headless`` (locustfile.py, tag ``native``) for
a fixed time and user count while sampling CPU% and RSS of every worker process, stop the server,
and collect locust's CSV stats. Writes ``reports/loadtest-<stamp>/`` (raw CSVs, ``summary.md``,
PNG charts) and, with ``--update-docs``, the comparison section of docs/benchmarks.md and ``docs/loadtest/``.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from bench.harness import ROOT, model_server

LOCUST = str(Path(sys.executable).with_name("locust"))
MATRIX = {  # name: (label, model, backend, mode)
    "tf-threaded": ("TensorFlow threaded", "digits-tf", "tensorflow", "threaded"),
    "tf-process": ("TensorFlow process", "digits-tf", "tensorflow", "process"),
    "torch-process": ("PyTorch process", "digits-torch", "pytorch", "process"),
    "onnx-threaded": ("ONNX threaded", "digits-torch", "onnx", "threaded"),
    "tf-batched": ("TensorFlow batched", "digits-tf", "tensorflow", "batched"),
    "torch-batched": ("PyTorch batched", "digits-torch", "pytorch", "batched"),
    "onnx-batched": ("ONNX batched", "digits-torch", "onnx", "batched"),
}
FRONT_SUFFIXES = {"wsgi": "", "asgi": "-asgi"}
CONFIGS = {  # name: (label, model, backend, mode, front): each MATRIX entry on WSGI, then on ASGI as <name>-asgi
    name + suffix: (*config, front) for name, config in MATRIX.items() for front, suffix in FRONT_SUFFIXES.items()
}
QUICK = ["tf-threaded", "torch-process", "onnx-batched", "onnx-batched-asgi"]
SECTION_START, SECTION_END = "<!-- loadtest:start -->", "<!-- loadtest:end -->"


@dataclass
class Result:
    """One configuration's run: locust's aggregate plus resource samples per worker."""

    name: str
    shape: str
    front: str
    requests: int = 0
    failures: int = 0
    rps: float = 0.0
    p50: float = 0.0
    p95: float = 0.0
    p99: float = 0.0
    cpu: list[float] = field(default_factory=list)  # per worker, mean % of one core
    rss_mb: list[float] = field(default_factory=list)  # per worker, max


class ResourceSampler(threading.Thread):
    """Samples CPU% and RSS of the gunicorn master's children twice a second."""

    def __init__(self, master_pid: int) -> None:
        super().__init__(daemon=True)
        self.master = psutil.Process(master_pid)
        self.stop_event = threading.Event()
        self.cpu: dict[int, list[float]] = {}
        self.rss: dict[int, list[float]] = {}

    def run(self) -> None:
        workers = {p.pid: p for p in self.master.children()}
        for process in workers.values():
            process.cpu_percent(None)
        while not self.stop_event.wait(0.5):
            for pid, process in workers.items():
                try:
                    self.cpu.setdefault(pid, []).append(process.cpu_percent(None))
                    self.rss.setdefault(pid, []).append(process.memory_info().rss / 2**20)
                except psutil.NoSuchProcess:
                    continue


def run_config(name: str, args: argparse.Namespace, out_dir: Path, step_ramp: bool = False) -> Result:
    label, model, backend, mode, front = CONFIGS[name]
    threads = {"process": 1, "threaded": 4, "batched": 16}[mode]  # on ASGI: the app's pool
    tag = f"{name}-ramp" if step_ramp else name
    result = Result(label + (" (step ramp)" if step_ramp else ""), f"{args.workers} x {threads}", front)
    with model_server(front, args.repo, out_dir, tag, model=model, backend=backend, mode=mode, workers=args.workers,
                      threads=threads) as server:
        assert server.proc is not None
        sampler = ResourceSampler(server.proc.pid)
        command = [LOCUST, "-f", str(ROOT / "locustfile.py"), "--host", server.url, "--headless", "--only-summary",
                   "--tags", "native", "--csv", str(out_dir / tag), "--max-fail-ratio", "1", "--max-p95-ms", "1e9"]
        if step_ramp:
            command += ["--csv-full-history", "--step-users", str(args.ramp_step), "--step-seconds",
                        str(args.ramp_seconds), "--ramp-max-users", str(args.ramp_max_users)]
            environment = {"STEP_RAMP": "1"}
        else:
            command += ["-u", str(args.users), "-r", str(args.users), "-t", f"{args.duration}s"]
            environment = {}
        sampler.start()
        limit = args.ramp_seconds * (args.ramp_max_users // args.ramp_step + 2) if step_ramp else args.duration
        subprocess.run(command, cwd=ROOT, env={**server.env, **environment}, stdout=subprocess.DEVNULL,
                       stderr=open(out_dir / f"{tag}-locust.log", "wb"), timeout=limit + 60, check=False)
        sampler.stop_event.set()
        sampler.join()
    _read_stats(out_dir / f"{tag}_stats.csv", result)
    result.cpu = [sum(v) / len(v) for v in sampler.cpu.values() if v]
    result.rss_mb = [max(v) for v in sampler.rss.values() if v]
    return result


def _read_stats(path: Path, result: Result) -> None:
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            if row["Name"] == "Aggregated":
                result.requests, result.failures = int(row["Request Count"]), int(row["Failure Count"])
                result.rps = float(row["Requests/s"])
                result.p50, result.p95, result.p99 = (float(row["50%"]), float(row["95%"]), float(row["99%"]))


def summary_table(results: list[Result]) -> str:
    """The comparison table; ASGI rows also get their requests/s against the WSGI row of the same configuration."""
    lines = ["| config | workers x threads | front | requests/s | ASGI / WSGI | p50 ms | p95 ms | p99 ms | failures"
             " | CPU % per worker | RSS MB per worker |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    wsgi = {r.name: r.rps for r in results if r.front == "wsgi"}
    for r in results:
        cpu = " / ".join(f"{c:.0f}" for c in r.cpu) or "-"
        rss = " / ".join(f"{m:.0f}" for m in r.rss_mb) or "-"
        ratio = f"{r.rps / wsgi[r.name]:.2f}" if r.front == "asgi" and wsgi.get(r.name) else ""
        lines.append(f"| {r.name} | {r.shape} | {r.front} | {r.rps:,.0f} | {ratio} | {r.p50:.0f} | {r.p95:.0f} |"
                     f" {r.p99:.0f} | {r.failures} of {r.requests} | {cpu} | {rss} |")
    return "\n".join(lines)


def draw_charts(results: list[Result], out_dir: Path, ramp_history: Path | None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        paths.append(out_dir / name)
        fig.savefig(paths[-1], dpi=100)

    names = [f"{r.name}, {r.front}" for r in results]
    paths: list[Path] = []
    height = max(3.8, 0.3 * len(results) + 1.0)
    fig, ax = plt.subplots(figsize=(9, height))
    ax.barh(names, [r.rps for r in results], color="tab:blue")
    ax.set_xlabel("requests/s (locust, native API)")
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)
    save(fig, "throughput.png")
    fig, ax = plt.subplots(figsize=(9, height))
    for offset, (key, color) in enumerate((("p50", "tab:green"), ("p95", "tab:orange"), ("p99", "tab:red"))):
        ax.barh([i + (offset - 1) * 0.27 for i in range(len(results))], [getattr(r, key) for r in results],
                height=0.27, label=key, color=color)
    ax.set_yticks(range(len(results)), names)
    ax.invert_yaxis()
    ax.set_xlabel("latency (ms)")
    ax.legend()
    ax.grid(axis="x", alpha=0.3)
    save(fig, "latency.png")
    if ramp_history is not None and ramp_history.exists():
        users, rps, p99 = [], [], []
        with open(ramp_history, newline="") as handle:
            for row in csv.DictReader(handle):
                if row["Name"] == "Aggregated" and row["User Count"] not in ("", "0"):
                    users.append(int(row["User Count"]))
                    rps.append(float(row["Requests/s"]))
                    p99.append(float(row["99%"]) if row["99%"] not in ("N/A", "") else 0.0)
        fig, ax = plt.subplots(figsize=(9, 3.8))
        ax.plot(users, rps, ".", color="tab:blue", label="requests/s")
        ax.set_xlabel("users")
        ax.set_ylabel("requests/s")
        twin = ax.twinx()
        twin.plot(users, p99, ".", color="tab:red", label="p99 ms")
        twin.set_ylabel("p99 (ms)")
        fig.legend(loc="upper left")
        save(fig, "step-ramp.png")
    plt.close("all")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated of: {', '.join(CONFIGS)}")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--duration", type=int, default=30, help="seconds of load per configuration")
    parser.add_argument("--quick", action="store_true", help=f"{', '.join(QUICK)} for 20 s each (~2.5 minutes)")
    parser.add_argument("--step-ramp", default="", help="also run a step ramp against this configuration")
    parser.add_argument("--ramp-step", type=int, default=8, help="users added per ramp step")
    parser.add_argument("--ramp-seconds", type=int, default=10, help="seconds per ramp step")
    parser.add_argument("--ramp-max-users", type=int, default=96)
    parser.add_argument("--repo", type=Path, default=ROOT / "models")
    parser.add_argument("--out", type=Path, default=None, help="report directory (default reports/loadtest-<stamp>)")
    parser.add_argument("--update-docs", action="store_true", help="write the comparison section of docs/benchmarks.md")
    args = parser.parse_args()
    names = QUICK if args.quick else [n.strip() for n in args.configs.split(",") if n.strip()]
    if args.quick:
        args.duration = min(args.duration, 20)
    unknown = [n for n in names + ([args.step_ramp] if args.step_ramp else []) if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration(s) {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    stamp = datetime.now(UTC).strftime("%Y-%m-%d-%H%M")
    out_dir = args.out or ROOT / "reports" / f"loadtest-{stamp}"
    out_dir.mkdir(parents=True, exist_ok=True)

    results = []
    for index, name in enumerate(names, start=1):
        print(f"[{index}/{len(names)}] {CONFIGS[name][0]}, {CONFIGS[name][4]}: {args.users} users for"
              f" {args.duration}s ...", flush=True)
        started = time.monotonic()
        result = run_config(name, args, out_dir)
        results.append(result)
        print(f"    {result.rps:,.0f} req/s, p50 {result.p50:.0f} ms, p99 {result.p99:.0f} ms, failures"
              f" {result.failures}/{result.requests}, RSS/worker {', '.join(f'{m:.0f}' for m in result.rss_mb)} MB"
              f" ({time.monotonic() - started:.0f}s)", flush=True)
    ramp_history = None
    if args.step_ramp:
        print(f"[ramp] {CONFIGS[args.step_ramp][0]}, {CONFIGS[args.step_ramp][4]}: +{args.ramp_step} users every"
              f" {args.ramp_seconds}s ...", flush=True)
        ramp = run_config(args.step_ramp, args, out_dir, step_ramp=True)
        ramp_history = out_dir / f"{args.step_ramp}-ramp_stats_history.csv"
        print(f"    peak window {ramp.rps:,.0f} req/s overall, p99 {ramp.p99:.0f} ms", flush=True)
    charts = draw_charts(results, out_dir, ramp_history)
    table = summary_table(results)
    header = (f"# Load test, {stamp} UTC\n\nlocust (FastHttpUser, tag `native`: 60% `/predict/label` JSON, 30%"
              f" `/predict` JSON, 10% PNG upload; a wrong label counts as a failure), {args.users} users for"
              f" {args.duration}s per configuration, gunicorn -w {args.workers}, locust and the server on the same"
              f" {psutil.cpu_count()}-core machine. Front `asgi`: SERVING_FRONT=asgi, `asgi_server:app` under the"
              " ASGI worker gunicorn.conf.py picks, with the same model, mode, workers and threads (its pool) as the"
              " WSGI row of the same configuration; `ASGI / WSGI` compares the two.\n\n")
    charts_md = "\n".join(f"![{p.stem}]({p.name})" for p in charts)
    (out_dir / "summary.md").write_text(header + table + "\n\n" + charts_md + "\n")
    print("\n" + table + f"\n\nreport: {out_dir / 'summary.md'}")
    if args.update_docs:
        update_docs(header, table, charts, out_dir)


def update_docs(header: str, table: str, charts: list[Path], out_dir: Path) -> None:
    """Replace the comparison section of docs/benchmarks.md with this run's table and charts (copied to docs/)."""
    docs = ROOT / "docs" / "loadtest"
    docs.mkdir(parents=True, exist_ok=True)
    for chart in charts:
        shutil.copy(chart, docs / chart.name)
    images = "\n".join(f"![{c.stem}](loadtest/{c.name})" for c in charts)
    body = header.split("\n", 2)[2].strip()
    section = f"{SECTION_START}\n{body}\n\n{table}\n\n{images}\n{SECTION_END}"
    page = ROOT / "docs" / "benchmarks.md"
    text = page.read_text()
    start, end = text.index(SECTION_START), text.index(SECTION_END) + len(SECTION_END)
    page.write_text(text[:start] + section + text[end:])
    print(f"docs/benchmarks.md comparison section updated from {out_dir.name}")


if __name__ == "__main__":
    main()
