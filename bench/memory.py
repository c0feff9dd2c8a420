"""Memory of the whole server (master and every worker, model pool included) per backend, mode and workers.

For each configuration: start the server as shipped, drive it with wrk for ``--warmup`` seconds (every worker
serves), then read ``/proc/<pid>/smaps_rollup`` of the master and every process below it: RSS, PSS and USS
(private). PSS splits shared pages fairly, so its sum is what the server costs; the marginal cost of one more
worker is the slope of total PSS between the two largest worker counts. ``--share off`` serves with
``SERVING_SHARE_MEMORY=false``, the path every version before this benchmark took (nothing imported in the
master, every worker imports its framework and loads its model), so the two are compared in one run.

Writes ``reports/memory-<stamp>.md``, ``.csv`` and ``.png`` (total PSS against workers, one line per backend
and variant).

    python -m bench.memory                                 # the full matrix (about 15 minutes)
    python -m bench.memory --workers 1,4 --modes process   # a quick look
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import orjson

from bench.harness import ROOT, model_server, run_wrk, save_report, wrk_script
from serving.observability.memory import ProcessMemory, tree_memory

MB = 1e6
# backend -> the model serving it (the digits models `python train.py --dataset digits` writes)
MODELS = {"tensorflow": "digits-tf", "pytorch": "digits-torch", "onnx": "digits-tf"}
# issue 24's targets: total PSS at -w 4 (MB), or a ratio to the "off" variant at -w 8
TARGETS = {("tensorflow", 4): 450.0, ("pytorch", 4): 260.0}
ONNX_RATIO = 0.5


@dataclass
class Row:
    """One configuration's processes after warm-up."""

    backend: str
    mode: str
    variant: str
    workers: int
    front: str
    processes: list[ProcessMemory]
    requests: int
    errors: int

    @property
    def total_pss(self) -> float:
        return sum(p.pss for p in self.processes) / MB

    @property
    def total_rss(self) -> float:
        return sum(p.rss for p in self.processes) / MB

    @property
    def total_uss(self) -> float:
        return sum(p.uss for p in self.processes) / MB

    @property
    def master(self) -> ProcessMemory:
        return self.processes[0]

    def others(self) -> list[ProcessMemory]:
        return self.processes[1:]


def measure(args: argparse.Namespace, out_dir: Path, backend: str, mode: str, variant: str, workers: int,
            front: str, script: Path) -> Row:
    slug = f"{backend}-{mode}-{variant}-w{workers}-{front}"
    settings = {"model": MODELS[backend], "backend": backend, "mode": mode, "workers": workers,
                "threads": args.threads, "share_memory": "true" if variant != "off" else "false",
                "model_pool": "0"}
    if variant == "pool":
        settings["model_pool"] = str(args.pool_processes)
    for attempt in (1, 2):
        server = model_server(front, args.repo, out_dir, f"{slug}-{attempt}",
                              ["--no-control-socket", "--timeout", "60"], **settings)
        try:
            server.start(timeout=90)
        except AssertionError:
            # readiness counts distinct workers answering /health; the kernel may hand every probe to
            # the same idle gthread worker for a while: one more start, then give up
            server.stop()
            if attempt == 2:
                raise
            continue
        try:
            result = run_wrk(server.url + "/predict", script, max(2, 2 * workers), args.warmup)
            time.sleep(1.0)
            processes = tree_memory(server.pid)
        finally:
            server.stop()
        break
    return Row(backend, mode, variant, workers, front, processes, result.requests, result.errors)


def measure_floor(args: argparse.Namespace, backend: str, workers: int) -> float:
    """Total PSS (MB) of the framework alone at ``workers`` runners: bench/memory_floor.py, in a fresh process."""
    out = subprocess.run([sys.executable, "-m", "bench.memory_floor", "--repo", str(args.repo), "--model",
                          MODELS[backend], "--backend", backend, "--children", str(workers)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, check=True)
    return int(out.stdout.split()[-1]) / MB


def render_floors(rows: list[Row], floors: dict[tuple[str, int], float]) -> list[str]:
    """The framework's floor against the server's best figure at the same worker count."""
    lines = ["", "## The framework alone", "",
             "`python -m bench.memory_floor`: a parent does what the master does before fork (imports the framework,"
             " loads the model where that is fork-safe, freezes the collector, drops its library pages) and forks N"
             " children that each run 300 predictions, with no HTTP server at all; TensorFlow's children load their"
             " own model. The least a server of this design could cost; the difference is what gunicorn, Flask and"
             " the serving package add.", "",
             "| backend | runners / workers | framework alone | server, sharing on | server, pool | on - alone |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for (backend, workers), alone in sorted(floors.items()):
        best = {variant: min((r.total_pss for r in rows if (r.backend, r.workers, r.variant, r.mode)
                              == (backend, workers, variant, "process")), default=None) for variant in ("on", "pool")}
        cells = [f"{best[v]:,.0f}" if best[v] is not None else "-" for v in ("on", "pool")]
        extra = f"{best['on'] - alone:,.0f}" if best["on"] is not None else "-"
        lines.append(f"| {backend} | {workers} | {alone:,.0f} | {cells[0]} | {cells[1]} | {extra} |")
    return lines


def render(rows: list[Row], args: argparse.Namespace, stamp: str, chart: Path | None,
           floors: dict[tuple[str, int], float] | None = None) -> str:
    lines = [
        f"# Memory, {stamp} UTC",
        "",
        f"`python -m bench.memory` on {os.cpu_count()} cores: every process of the server (master, workers, model pool)"
        f" after {args.warmup} s of wrk on `POST /predict` (one 8x8 digits sample), read from"
        " `/proc/<pid>/smaps_rollup`. MB = 10^6 bytes. PSS splits shared pages between the processes that map them,"
        " so the total is what the server costs; RSS counts a shared page once per process. `off` is"
        " `SERVING_SHARE_MEMORY=false`, the path every earlier version took; `on` imports the framework in the"
        " master, builds the app there and freezes the collector before fork; `pool` is the model pool"
        " (`SERVING_MODEL_POOL=1`). The defaults: TensorFlow through the pool in process mode"
        " (`SERVING_MODEL_POOL=auto`) and shared (`on`) in threaded and batched mode, PyTorch and ONNX Runtime"
        " shared (`on`).",
        "",
    ]
    if chart is not None:
        lines += [f"![total PSS against workers]({chart.name})", ""]
    lines += [
        "| backend | mode | variant | front | -w | total PSS | total USS | total RSS | master PSS"
        " | per worker PSS / USS (mean) | requests | errors |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        others = row.others()
        mean_pss = sum(p.pss for p in others) / len(others) / MB if others else 0.0
        mean_uss = sum(p.uss for p in others) / len(others) / MB if others else 0.0
        lines.append(
            f"| {row.backend} | {row.mode} | {row.variant} | {row.front} | {row.workers} | {row.total_pss:,.0f} |"
            f" {row.total_uss:,.0f} | {row.total_rss:,.0f} | {row.master.pss / MB:,.0f} |"
            f" {mean_pss:,.0f} / {mean_uss:,.0f} | {row.requests:,} | {row.errors} |")
    lines += ["", "## One more worker", "",
              "Slope of total PSS between the two largest worker counts of each line.", "",
              "| backend | mode | variant | front | MB per extra worker |", "| --- | --- | --- | --- | ---: |"]
    for key, line in _lines(rows).items():
        if len(line) >= 2:
            (w1, p1), (w2, p2) = line[-2], line[-1]
            lines.append(f"| {' | '.join(key)} | {(p2 - p1) / (w2 - w1):,.1f} |")
    lines += ["", "## Targets (issue 24)", "", "| target | measured | met |", "| --- | --- | --- |"]
    by_key = {(r.backend, r.mode, r.variant, r.front, r.workers): r for r in rows}
    for (backend, workers), limit in TARGETS.items():
        best = [r for r in rows if r.backend == backend and r.workers == workers and r.variant != "off"]
        if best:
            row = min(best, key=lambda r: r.total_pss)
            lines.append(f"| {backend} -w {workers} total PSS <= {limit:.0f} MB | {row.total_pss:,.0f} MB"
                         f" ({row.mode}, {row.variant}) | {'yes' if row.total_pss <= limit else 'no'} |")
    for row in rows:
        off = by_key.get(("onnx", row.mode, "off", row.front, 8))
        if row.backend == "onnx" and row.workers == 8 and row.variant == "on" and off is not None:
            ratio = row.total_pss / off.total_pss
            met = "yes" if ratio <= ONNX_RATIO else "no"
            lines.append(f"| onnx {row.mode} -w 8 total PSS <= {ONNX_RATIO} of off | {ratio:.2f}"
                         f" ({row.total_pss:,.0f} / {off.total_pss:,.0f} MB) | {met} |")
    if floors:
        lines += render_floors(rows, floors)
    return "\n".join(lines) + "\n"


def _lines(rows: list[Row]) -> dict[tuple[str, ...], list[tuple[int, float]]]:
    lines: dict[tuple[str, ...], list[tuple[int, float]]] = {}
    for row in rows:
        lines.setdefault((row.backend, row.mode, row.variant, row.front), []).append((row.workers, row.total_pss))
    return {key: sorted(points) for key, points in lines.items()}


def draw(rows: list[Row], path: Path) -> Path | None:
    """Total PSS against workers: one panel per backend, a line per mode and variant."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    backends = list(dict.fromkeys(row.backend for row in rows))
    figure, panels = plt.subplots(1, len(backends), figsize=(4.2 * len(backends), 4.2), squeeze=False)
    colours = {"off": "#888888", "on": "#1f77b4", "pool": "#ff7f0e"}
    styles = {"process": "-", "threaded": "--", "batched": ":"}
    for axes, backend in zip(panels[0], backends, strict=True):
        for key, points in _lines([r for r in rows if r.backend == backend]).items():
            _, mode, variant, front = key
            label = f"{mode}, {variant}" + ("" if front == "wsgi" else f", {front}")
            axes.plot([w for w, _ in points], [p for _, p in points], styles.get(mode, "-"), marker="o",
                      color=colours.get(variant), label=label)
        axes.set_title(backend)
        axes.set_xlabel("gunicorn workers")
        axes.set_ylim(bottom=0)
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=7)
    panels[0][0].set_ylabel("total PSS of the server (MB)")
    figure.suptitle("Server memory against workers (off: every worker its own copy; on: shared; pool)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="tensorflow,pytorch,onnx")
    parser.add_argument("--modes", default="process,threaded,batched")
    parser.add_argument("--variants", default="off,on,pool",
                        help="off, on (sharing across fork), pool (the model pool)")
    parser.add_argument("--workers", default="1,2,4,8", help="comma-separated worker counts")
    parser.add_argument("--fronts", default="wsgi")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--pool-processes", type=int, default=1, help="model processes of the pool variant")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of wrk before reading memory")
    parser.add_argument("--repo", type=Path, default=ROOT / "models")
    parser.add_argument("--reports", type=Path, default=ROOT / "reports")
    parser.add_argument("--floor-workers", default="4", help="runner counts of the framework-alone rows (empty: none)")
    args = parser.parse_args()
    stamp = datetime.now(UTC).strftime("%Y-%m-%d-%H%M")
    out_dir = args.reports / f"memory-{stamp}"
    out_dir.mkdir(parents=True, exist_ok=True)
    sample = orjson.loads((args.repo / "digits-tf" / "1" / "sample.json").read_bytes())
    script = wrk_script(out_dir / "predict.lua", orjson.dumps({"data": sample["data"]}))
    rows: list[Row] = []
    for backend in args.backends.split(","):
        for mode in args.modes.split(","):
            for variant in args.variants.split(","):
                if backend == "pytorch" and mode == "threaded" and variant != "pool":
                    continue  # process-only backend: the server refuses it (the pool's HTTP threads never call it)
                if variant == "pool" and mode == "batched":
                    continue  # the pool batches across workers itself: refused with batched mode
                for front in args.fronts.split(","):
                    for workers in (int(w) for w in args.workers.split(",")):
                        row = measure(args, out_dir, backend, mode, variant, workers, front, script)
                        rows.append(row)
                        print(f"{backend} {mode} {variant} {front} -w {workers}: {row.total_pss:,.0f} MB PSS"
                              f" ({len(row.processes)} processes, {row.requests} requests, {row.errors} errors)",
                              flush=True)
    with open(args.reports / f"memory-{stamp}.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["backend", "mode", "variant", "front", "workers", "pid", "rss", "pss", "uss"])
        for row in rows:
            for p in row.processes:
                writer.writerow([row.backend, row.mode, row.variant, row.front, row.workers, p.pid, p.rss, p.pss,
                                 p.uss])
    floors = {(backend, workers): measure_floor(args, backend, workers)
              for backend in args.backends.split(",")
              for workers in (int(w) for w in args.floor_workers.split(",") if w)}
    chart = draw(rows, args.reports / f"memory-{stamp}.png")
    report = render(rows, args, stamp, chart, floors)
    path = args.reports / f"memory-{stamp}.md"
    save_report(path, report)


if __name__ == "__main__":
    main()
