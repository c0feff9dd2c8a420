"""Throughput of each backend x mode on the WSGI and the ASGI front, against a no-op Flask floor, in one run.

    python -m bench.throughput [--seconds 10] [--connections 32] [--workers 2] [--fronts wsgi,asgi] [--repo models]

Starts each server in turn (nothing else should be running), drives ``POST /predict`` with one
digits sample per request using wrk on 127.0.0.1, and writes ``reports/bench-<date>.md`` plus the
raw wrk output under ``reports/bench-<date>/``. Every configuration runs ``--rounds`` times, on each
front right after the other (same model, mode, workers and threads; SERVING_FRONT=asgi serves
``asgi_server:app``); the no-op floor runs before, between and after the rounds, and each run is
reported as a ratio to the floors measured around it, since absolute numbers on a shared 2-core
machine drift. ASGI rows also get their ratio to the WSGI run of the same configuration and round.
The model server runs as shipped: request ids, access logging and input validation on.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import orjson

from bench.harness import ROOT, WrkResult, mnist_script, model_server, parse_fronts, run_wrk, save_report, wrk_script
from serving.toolchain.data import load_digits_dataset
from serving.tools.testing import GunicornServer

ASGI_TARGET = 0.8  # issue 16: the ASGI front within 0.8 of WSGI threaded mode, single samples
CONFIGS = [  # (label, model, backend, mode, WSGI target ratio to the floor; 0 = no target, reported only)
    ("onnx / process", "digits-torch", "onnx", "process", 0.85),
    ("onnx / threaded", "digits-tf", "onnx", "threaded", 0.85),
    ("pytorch / process", "digits-torch", "pytorch", "process", 0.85),
    ("tensorflow / process", "digits-tf", "tensorflow", "process", 0.5),
    ("tensorflow / threaded", "digits-tf", "tensorflow", "threaded", 0.5),
    # Real MNIST (28x28 lenet models, one t10k digit per request): the workload users serve.
    ("mnist onnx / process", "mnist-torch", "onnx", "process", 0.0),
    ("mnist onnx / threaded", "mnist-tf", "onnx", "threaded", 0.0),
    ("mnist pytorch / process", "mnist-torch", "pytorch", "process", 0.0),
    ("mnist tensorflow / process", "mnist-tf", "tensorflow", "process", 0.0),
    ("mnist tensorflow / threaded", "mnist-tf", "tensorflow", "threaded", 0.0),
]


@dataclass
class Run:
    """One wrk run of a configuration on a front, with its ratios."""

    result: WrkResult
    to_floor: float  # against the mean of the no-op floors measured just before and after its round
    to_wsgi: float | None  # ASGI runs: against the WSGI run of the same configuration in the same round


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10, help="wrk duration per configuration")
    parser.add_argument("--connections", type=int, default=32, help="concurrent wrk connections")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers for every server")
    parser.add_argument("--threads", type=int, default=4, help="threads per worker in threaded mode (ASGI: the pool)")
    parser.add_argument("--fronts", default="wsgi,asgi", help="comma-separated fronts to run every configuration on")
    parser.add_argument("--repo", type=Path, default=ROOT / "models", help="model repository")
    parser.add_argument("--only", default="", help="comma-separated substrings of config labels to run")
    parser.add_argument("--rounds", type=int, default=2, help="runs of every configuration")
    parser.add_argument("--api-key", default="", help="serve with SERVING_API_KEYS=KEY and send it (key overhead)")
    parser.add_argument("--no-mnist", action="store_true", help="leave out the MNIST configurations")
    parser.add_argument("--reports", type=Path, default=ROOT / "reports", help="where the report and raw output go")
    args = parser.parse_args()
    fronts = parse_fronts(args.fronts)

    stamp = datetime.now(UTC).strftime("%Y-%m-%d-%H%M")
    out_dir = args.reports / f"bench-{stamp}"
    out_dir.mkdir(parents=True, exist_ok=True)
    sample = load_digits_dataset(seed=0).x_test[0]
    body = orjson.dumps({"data": sample.reshape(-1).tolist()})
    auth = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    script = wrk_script(out_dir / "predict.lua", body, headers=auth)
    scripts = {"digits": script}
    common = ["-w", str(args.workers), "--backlog", "2048", "--timeout", "30", "--no-control-socket"]

    def floor(tag: str) -> WrkResult:
        print(f"no-op floor ({tag}) ...", flush=True)
        with GunicornServer(None, out_dir, [*common, "-k", "sync"], cwd=ROOT, app="bench.noop_app:app",
                            config="bench/noop.conf.py", ready="answer", ready_path="/predict",
                            log_file=out_dir / f"noop-{tag}.log") as server:
            result = run_wrk(server.url + "/predict", script, args.connections, args.seconds)
        (out_dir / f"noop-{tag}.txt").write_text(result.raw)
        print(f"  {result.requests_per_s:,.0f} req/s", flush=True)
        return result

    selected = [c for c in CONFIGS if (not args.only or any(s in c[0] for s in args.only.split(",")))
                and not (args.no_mnist and c[1].startswith("mnist"))]
    if any(c[1].startswith("mnist") for c in selected):
        missing = [m for m in ("mnist-tf", "mnist-torch") if not (args.repo / m).is_dir()]
        if missing:
            raise SystemExit(f"{', '.join(missing)} not in {args.repo}: run python train.py --dataset mnist"
                             " --framework all (or pass --no-mnist)")
        scripts["mnist"] = mnist_script(out_dir, headers=auth)
    floors = [floor("round 1")]
    runs: dict[tuple[str, str], list[Run]] = {(c[0], front): [] for c in selected for front in fronts}
    for round_number in range(1, args.rounds + 1):
        round_results: dict[tuple[str, str], WrkResult] = {}
        for label, model, backend, mode, _target in selected:
            for front in fronts:  # back to back, so the fronts of a configuration see the same machine
                print(f"round {round_number}: {label} ({model}), {front} ...", flush=True)
                slug = f"{label.replace(' / ', '-').replace(' ', '-')}-{front}-r{round_number}"
                with model_server(front, args.repo, out_dir, slug, common, model=model, backend=backend, mode=mode,
                                  threads=args.threads, workers=args.workers, api_keys=args.api_key) as server:
                    workload = scripts["mnist" if model.startswith("mnist") else "digits"]
                    result = run_wrk(server.url + "/predict", workload, args.connections, args.seconds)
                (out_dir / f"{slug}.txt").write_text(result.raw)
                round_results[(label, front)] = result
                print(f"  {result.requests_per_s:,.0f} req/s, p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms,"
                      f" errors {result.errors}", flush=True)
        floors.append(floor(f"round {round_number + 1}" if round_number < args.rounds else "last"))
        local_floor = (floors[-2].requests_per_s + floors[-1].requests_per_s) / 2
        for (label, front), result in round_results.items():  # each run against the floors measured around it
            wsgi = round_results.get((label, "wsgi"))
            to_wsgi = result.requests_per_s / wsgi.requests_per_s if front == "asgi" and wsgi else None
            runs[(label, front)].append(Run(result, result.requests_per_s / local_floor, to_wsgi))

    rows = []
    for label, _model, _backend, mode, target in selected:
        shape = f"{args.workers} x {args.threads if mode == 'threaded' else 1}"
        for front in fronts:
            rows.append((label, front, mode, shape, runs[(label, front)], target))
    report = render(rows, floors, args, stamp)
    path = args.reports / f"bench-{stamp}.md"
    save_report(path, report)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def render(rows: list[tuple[str, str, str, str, list[Run], float]], floors: list[WrkResult],
           args: argparse.Namespace, stamp: str) -> str:
    lines = [
        f"# Throughput benchmark, {stamp} UTC",
        "",
        f"wrk -t2 -c{args.connections} -d{args.seconds}s on 127.0.0.1, `POST /predict` with one 8x8 digits sample"
        " (JSON; the mnist rows: the first t10k digit as 784 8-bit pixels with `pixel_range` [0, 255])"
        f"{', with an API key on every request' if args.api_key else ''},"
        f" gunicorn -w {args.workers} for every server, on the same machine as the load generator"
        f" ({_cores()} cores). The model server runs as shipped: request ids, access log, metrics, validation on."
        f" Fronts: {args.fronts} (`asgi`: SERVING_FRONT=asgi, `asgi_server:app` under the ASGI worker"
        " gunicorn.conf.py picks; its threads are the app's pool), each configuration's fronts back to back."
        f" {args.rounds} rounds; the no-op floor runs before the first round, between rounds and after the last,"
        " and each run's ratio is taken against the mean of the floors measured just before and after it."
        " `ASGI / WSGI` is the mean over rounds of an ASGI run against the WSGI run of the same configuration"
        f" and round. Targets: WSGI rows against the floor; ASGI threaded rows >= {ASGI_TARGET} of WSGI threaded.",
        "",
        "| server | front | workers x threads | req/s (mean) | p50 ms | p99 ms (worst) | errors"
        " | ratio to no-op (mean) | ASGI / WSGI (mean) | target | met |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    floor_rps = _mean([f.requests_per_s for f in floors])
    floor_p50 = _mean([f.p50_ms for f in floors])
    lines.append(f"| no-op Flask | wsgi (sync) | {args.workers} x 1 | {floor_rps:,.0f} | {floor_p50:.2f}"
                 f" | {max(f.p99_ms for f in floors):.2f} | {sum(f.errors for f in floors)} | 1.00 | | | |")
    for label, front, mode, shape, runs, target in rows:
        errors = sum(r.result.errors for r in runs)
        to_floor = _mean([r.to_floor for r in runs])
        to_wsgi = [r.to_wsgi for r in runs if r.to_wsgi is not None]
        ratio = _mean(to_wsgi) if to_wsgi else None
        value: float | None = to_floor
        goal = f">= {target} x no-op" if target else ""
        if front == "asgi":  # the target for the front: threaded mode against WSGI threaded
            target = ASGI_TARGET if mode == "threaded" else 0.0
            value, goal = ratio, f">= {ASGI_TARGET} x WSGI" if target else ""
        met = ("yes" if value >= target and not errors else "NO") if target and value is not None else ""
        lines.append(f"| {label} | {front} | {shape} | {_mean([r.result.requests_per_s for r in runs]):,.0f}"
                     f" | {_mean([r.result.p50_ms for r in runs]):.2f} | {max(r.result.p99_ms for r in runs):.2f}"
                     f" | {errors} | {to_floor:.2f} | {'' if ratio is None else f'{ratio:.2f}'} | {goal} | {met} |")
    lines += ["", "No-op floor runs (req/s): " + ", ".join(f"{f.requests_per_s:,.0f}" for f in floors), ""]
    return "\n".join(lines)


def _cores() -> int:
    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    main()
