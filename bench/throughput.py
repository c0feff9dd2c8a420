"""Throughput of each backend x mode against a no-op Flask floor, under the same gunicorn settings.

    python bench/throughput.py [--seconds 10] [--connections 32] [--workers 2] [--repo models]

Starts each server in turn (nothing else should be running), drives ``POST /predict`` with one
digits sample per request using wrk on 127.0.0.1, and writes ``reports/bench-<date>.md`` plus the
raw wrk output under ``reports/bench-<date>/``. The no-op floor runs first and last; results are
ratios to the mean of those two runs, since absolute numbers on a shared 2-core machine drift.
The model server runs as shipped: request ids, access logging and input validation on.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import ROOT, Server, WrkResult, run_wrk, wrk_script  # noqa: E402
from serving.data import load_digits_dataset  # noqa: E402

CONFIGS = [  # (label, model, backend, mode, target ratio to the floor)
    ("onnx / process", "digits-torch", "onnx", "process", 0.85),
    ("onnx / threaded", "digits-tf", "onnx", "threaded", 0.85),
    ("pytorch / process", "digits-torch", "pytorch", "process", 0.85),
    ("tensorflow / process", "digits-tf", "tensorflow", "process", 0.5),
    ("tensorflow / threaded", "digits-tf", "tensorflow", "threaded", 0.5),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10, help="wrk duration per configuration")
    parser.add_argument("--connections", type=int, default=32, help="concurrent wrk connections")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers for every server")
    parser.add_argument("--threads", type=int, default=4, help="threads per worker in threaded mode")
    parser.add_argument("--repo", type=Path, default=ROOT / "models", help="model repository")
    parser.add_argument("--only", default="", help="comma-separated substrings of config labels to run")
    args = parser.parse_args()

    stamp = datetime.now(UTC).strftime("%Y-%m-%d-%H%M")
    out_dir = ROOT / "reports" / f"bench-{stamp}"
    out_dir.mkdir(parents=True, exist_ok=True)
    sample = load_digits_dataset(seed=0).x_test[0]
    body = orjson.dumps({"data": sample.reshape(-1).tolist()})
    script = wrk_script(out_dir / "predict.lua", body)
    common = ["-w", str(args.workers), "--backlog", "2048", "--timeout", "30", "--no-control-socket"]

    def floor(tag: str) -> WrkResult:
        print(f"no-op floor ({tag}) ...", flush=True)
        with Server("bench.noop_app:app", "bench/noop.conf.py", {}, [*common, "-k", "sync"],
                    out_dir / f"noop-{tag}.log", ready_path="/predict") as server:
            result = run_wrk(server.url + "/predict", script, args.connections, args.seconds)
        (out_dir / f"noop-{tag}.txt").write_text(result.raw)
        print(f"  {result.requests_per_s:,.0f} req/s", flush=True)
        return result

    first = floor("first")
    rows: list[tuple[str, str, WrkResult, float]] = []
    selected = [c for c in CONFIGS if not args.only or any(s in c[0] for s in args.only.split(","))]
    for label, model, backend, mode, target in selected:
        print(f"{label} ({model}) ...", flush=True)
        env = {"SERVING_MODEL_REPOSITORY": str(args.repo), "SERVING_MODEL": model, "SERVING_BACKEND": backend,
               "SERVING_MODE": mode, "SERVING_THREADS": str(args.threads), "SERVING_WORKERS": str(args.workers),
               "TF_CPP_MIN_LOG_LEVEL": "2"}
        slug = label.replace(" / ", "-")
        with Server("flask_server:app", "gunicorn.conf.py", env, [*common], out_dir / f"{slug}.log") as server:
            result = run_wrk(server.url + "/predict", script, args.connections, args.seconds)
        (out_dir / f"{slug}.txt").write_text(result.raw)
        shape = f"{args.workers} x {args.threads if mode == 'threaded' else 1}"
        rows.append((label, shape, result, target))
        print(f"  {result.requests_per_s:,.0f} req/s, p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms,"
              f" errors {result.errors}", flush=True)
    last = floor("last")

    noop = (first.requests_per_s + last.requests_per_s) / 2
    report = render(rows, first, last, noop, args, stamp)
    path = ROOT / "reports" / f"bench-{stamp}.md"
    path.write_text(report)
    print(report)
    print(f"report: {path}")


def render(rows: list[tuple[str, str, WrkResult, float]], first: WrkResult, last: WrkResult, noop: float,
           args: argparse.Namespace, stamp: str) -> str:
    lines = [
        f"# Throughput benchmark, {stamp} UTC",
        "",
        f"wrk -t2 -c{args.connections} -d{args.seconds}s on 127.0.0.1, `POST /predict` with one 8x8 digits sample"
        f" (JSON), gunicorn -w {args.workers} for every server, on the same machine as the load generator"
        f" ({_cores()} cores). The model server runs as shipped: request ids, access log, validation on.",
        "",
        "| server | workers x threads | req/s | p50 ms | p99 ms | errors | ratio to no-op | target | met |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        f"| no-op Flask (first) | {args.workers} x 1 | {first.requests_per_s:,.0f} | {first.p50_ms:.2f} |"
        f" {first.p99_ms:.2f} | {first.errors} | {first.requests_per_s / noop:.2f} | | |",
    ]
    for label, shape, result, target in rows:
        ratio = result.requests_per_s / noop
        lines.append(
            f"| {label} | {shape} | {result.requests_per_s:,.0f} | {result.p50_ms:.2f} | {result.p99_ms:.2f} |"
            f" {result.errors} | {ratio:.2f} | >= {target} | {'yes' if ratio >= target and not result.errors else 'NO'} |"
        )
    lines.append(
        f"| no-op Flask (last) | {args.workers} x 1 | {last.requests_per_s:,.0f} | {last.p50_ms:.2f} |"
        f" {last.p99_ms:.2f} | {last.errors} | {last.requests_per_s / noop:.2f} | | |"
    )
    lines += ["", f"No-op floor used for ratios: {noop:,.0f} req/s (mean of the first and last run).", ""]
    return "\n".join(lines)


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    main()
