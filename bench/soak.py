"""Soak: minutes of mixed load on one server, recording memory per worker, failures and latency drift.

    python -m bench.soak [--minutes 10] [--users 16] [--mode batched] [--backend onnx]

Starts gunicorn (gunicorn.conf.py, -w 2), runs locust headless with every native task (JSON,
probabilities, PNG uploads; answers checked) for ``--minutes``, samples each worker's RSS every
5 s, and writes ``reports/soak-<stamp>.md`` with the RSS, throughput and p50/p99 per minute, the
failures, and a PNG chart. Not part of ``make test``.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil

from bench.harness import ROOT, save_report
from bench.loadtest import LOCUST
from serving.tools.testing import GunicornServer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--mode", default="batched")
    parser.add_argument("--backend", default="onnx")
    parser.add_argument("--model", default="digits-torch")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repo", type=Path, default=ROOT / "models")
    args = parser.parse_args()
    stamp = datetime.now(UTC).strftime("%Y-%m-%d-%H%M")
    out_dir = ROOT / "reports" / f"soak-{stamp}"
    out_dir.mkdir(parents=True, exist_ok=True)
    seconds = int(args.minutes * 60)
    env = {"SERVING_MODEL_REPOSITORY": str(args.repo), "SERVING_MODEL": args.model, "SERVING_BACKEND": args.backend,
           "SERVING_MODE": args.mode, "SERVING_WORKERS": str(args.workers), "TF_CPP_MIN_LOG_LEVEL": "2"}
    samples: list[tuple[float, int, float]] = []  # (seconds since start, pid, rss MB)
    with GunicornServer(None, out_dir, ["--no-control-socket"], cwd=ROOT, env=env,
                        log_file=out_dir / "server.log") as server:
        assert server.proc is not None
        master = psutil.Process(server.proc.pid)
        stop = threading.Event()
        started = time.monotonic()

        def sample() -> None:
            while not stop.wait(5.0):
                for worker in master.children():
                    try:
                        samples.append((time.monotonic() - started, worker.pid, worker.memory_info().rss / 2**20))
                    except psutil.NoSuchProcess:
                        continue

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        print(f"soaking {args.mode}/{args.backend} with {args.users} users for {seconds}s ...", flush=True)
        subprocess.run([LOCUST, "-f", str(ROOT / "locustfile.py"), "--host", server.url, "--headless",
                        "--only-summary", "--tags", "native", "-u", str(args.users), "-r", str(args.users), "-t",
                        f"{seconds}s", "--csv", str(out_dir / "soak"), "--csv-full-history", "--max-fail-ratio",
                        "1", "--max-p95-ms", "1e9"], cwd=ROOT, env=server.env, stdout=subprocess.DEVNULL,
                       stderr=open(out_dir / "locust.log", "wb"), timeout=seconds + 120, check=False)
        stop.set()
        sampler.join()
    report = render(args, stamp, out_dir, samples)
    path = ROOT / "reports" / f"soak-{stamp}.md"
    save_report(path, report)


def render(args: argparse.Namespace, stamp: str, out_dir: Path, samples: list[tuple[float, int, float]]) -> str:
    with open(out_dir / "soak_stats.csv", newline="") as handle:
        total = next(row for row in csv.DictReader(handle) if row["Name"] == "Aggregated")
    minutes: dict[int, list[dict[str, str]]] = {}
    with open(out_dir / "soak_stats_history.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["Name"] == "Aggregated" and row["User Count"] != "0"]
    first = int(rows[0]["Timestamp"]) if rows else 0
    for row in rows:
        minutes.setdefault((int(row["Timestamp"]) - first) // 60, []).append(row)
    rss_by_minute: dict[int, list[float]] = {}
    for at, _pid, rss in samples:
        rss_by_minute.setdefault(int(at // 60), []).append(rss)
    lines = [f"# Soak, {stamp} UTC", "",
             f"{args.minutes:g} minutes of locust (tag `native`, answers checked), {args.users} users,"
             f" {args.mode} mode, {args.backend} backend, model {args.model}, gunicorn -w {args.workers}.", "",
             f"Requests: {int(total['Request Count']):,}, failures: {int(total['Failure Count'])},"
             f" mean {float(total['Requests/s']):,.0f} req/s, p50 {total['50%']} ms, p99 {total['99%']} ms.", "",
             "| minute | req/s | p50 ms (last window) | p99 ms (last window) | RSS MB per worker (max) |",
             "| ---: | ---: | ---: | ---: | ---: |"]
    for minute in sorted(minutes):
        window = minutes[minute][-1]
        rss = max(rss_by_minute.get(minute, [0.0]))
        lines.append(f"| {minute + 1} | {float(window['Requests/s']):,.0f} | {window['50%']} | {window['99%']} |"
                     f" {rss:.0f} |")
    if samples:
        per_pid: dict[int, list[float]] = {}
        for _, pid, rss in samples:
            per_pid.setdefault(pid, []).append(rss)
        growth = [values[-1] - values[min(2, len(values) - 1)] for values in per_pid.values()]
        lines += ["", f"RSS growth per worker from the first 15 s to the end: "
                      f"{', '.join(f'{g:+.1f} MB' for g in growth)} ({len(per_pid)} worker processes seen)."]
    chart = draw(samples, minutes, out_dir)
    lines += ["", f"![soak]({chart.relative_to(ROOT / 'reports')})", ""]
    return "\n".join(lines)


def draw(samples: list[tuple[float, int, float]], minutes: dict[int, list[dict[str, str]]], out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for pid in sorted({pid for _, pid, _ in samples}):
        points = [(at / 60, rss) for at, p, rss in samples if p == pid]
        top.plot([p[0] for p in points], [p[1] for p in points], label=f"worker {pid}")
    top.set_ylabel("RSS (MB)")
    top.legend()
    top.grid(alpha=0.3)
    xs = [m + 1 for m in sorted(minutes)]
    bottom.plot(xs, [float(minutes[m][-1]["50%"]) for m in sorted(minutes)], marker="o", label="p50")
    bottom.plot(xs, [float(minutes[m][-1]["99%"]) for m in sorted(minutes)], marker="o", label="p99")
    bottom.set_xlabel("minute")
    bottom.set_ylabel("latency (ms)")
    bottom.legend()
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    path = out_dir / "soak.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
