"""gRPC against HTTP v2 binary in one run, perf_analyzer over both protocols, and where the gRPC server runs.

    python -m bench.grpc [--model mnist-torch] [--seconds 6] [--workers 2] [--skip-placement]
                         [--cpu-affinity off|on|both]

One gunicorn server as shipped (process mode, the onnx backend, access log, metrics and validation on,
``--workers`` workers), real held-out samples of the model (t10k digits for mnist-torch), and:

- HTTP v2 binary (binary tensor extension both ways) driven by wrk, as bench/v2.py does: 1 sample at
  concurrency 1, and 64 samples at concurrency 16;
- the same two loads over gRPC with nghttp2's h2load, a C client as light as wrk (HTTP/2, one request in
  flight per connection as wrk does, so 16 connections spread over the workers): the comparison the
  throughput target uses;
- HTTP v2 binary and gRPC (``raw_input_contents``) driven by Triton's perf_analyzer (one C++ client for both
  protocols, installed by scripts/install-perf-analyzer.sh): 1 sample at concurrency 1..8 and 64 samples at
  concurrency 16 for HTTP, 12 and 24 for gRPC. perf_analyzer multiplexes up to 6 concurrent requests on one
  gRPC connection, so 12 and 24 open 2 and 4 connections; the kernel spreads connections, not calls, over the
  workers (SO_REUSEPORT), and the report counts the calls each worker answered;
- the bare model's limit: the backend's own predict on the same 64 samples in this process (one math thread),
  times the workers (bench/v2.py's measure);
- every request's status, from the server's access log: perf_analyzer must see no failed request.

All of it runs twice (``--cpu-affinity both``, the default): on the server as shipped, then with
SERVING_CPU_AFFINITY=true (each worker pinned to its own core; serving/host/affinity.py).

Then the placement (skipped with ``--skip-placement``): the same model under SERVING_FRONT=asgi (threaded mode),
once with the shipped gRPC server (a thread pool per worker, started after fork) and once with grpc.aio on the
worker's event loop (bench/grpc_aio.py), 1 sample at concurrency 1 and 64 samples at concurrency 12.

Targets (issue 25): gRPC with 64 samples serves >= the samples/s of HTTP v2 binary (h2load against wrk) and
>= 0.8 of the bare model's limit; gRPC's p50 for 1 sample at concurrency 1 <= HTTP v2 binary's with the same
client (perf_analyzer);
perf_analyzer runs over both protocols at concurrency 1..8 with no failed request.
Writes ``reports/grpc-<stamp>.md`` and the raw outputs under ``reports/grpc-<stamp>/``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import subprocess
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from bench.harness import ROOT, WrkResult, grpc_body, run_h2load, run_wrk, save_report
from bench.v2 import binary_script, bodies, held_out_samples, protocol_costs
from serving.store.repository import ModelMetadata, ModelRepository
from serving.tools.testing import GunicornServer

ACCESS = re.compile(r"\[(\d+)\] \[INFO\] \[[^\]]+\] \"(POST /v2/models/\S+/infer|GRPC \S+/ModelInfer)\" (\d+)"
                    r" [\d.]+ms model=\S+ batch=(\S+)")
LIMIT_TARGET = 0.8


@dataclass
class Row:
    """One measurement: the client, protocol, samples per request, concurrency and what it saw."""

    client: str
    protocol: str
    samples: int
    concurrency: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int = 0

    @property
    def samples_per_s(self) -> float:
        return self.requests_per_s * self.samples


def served_model(repo: Path, model: str) -> tuple[ModelMetadata, np.ndarray]:
    """The 28x28 model the benchmark serves and 64 of its held-out samples; exits saying how to train it."""
    if not (repo / model).is_dir():
        raise SystemExit(f"{model} is not in {repo}: python train.py --dataset mnist --framework pytorch")
    meta = ModelRepository(repo).resolve(model)
    return meta, held_out_samples(meta)[:64]


def server_env(repo: Path, meta: ModelMetadata, workers: int) -> dict[str, str]:
    """The model server's settings in these benchmarks: ONNX Runtime, process mode, 64-sample batches."""
    return {"SERVING_MODEL_REPOSITORY": str(repo), "SERVING_MODEL": meta.name, "SERVING_BACKEND": "onnx",
            "SERVING_MODE": "process", "SERVING_WORKERS": str(workers), "SERVING_MAX_BATCH": "64"}


def perf_analyzer_path() -> str:
    result = subprocess.run([str(ROOT / "scripts" / "install-perf-analyzer.sh")], capture_output=True, text=True,
                            timeout=900, check=True)
    return result.stdout.strip().splitlines()[-1]


def input_file(path: Path, x: np.ndarray, name: str) -> Path:
    """perf_analyzer's real-data file: one entry per sample (it takes -b of them per request)."""
    path.write_text(json.dumps({"data": [{name: sample.ravel().tolist()} for sample in x]}))
    return path


def levels(concurrency: str) -> list[int]:
    """perf_analyzer's ``--concurrency-range`` START[:END[:STEP]] as the levels it measures."""
    parts = [int(part) for part in concurrency.split(":")]
    start, end, step = parts[0], parts[1] if len(parts) > 1 else parts[0], parts[2] if len(parts) > 2 else 1
    return list(range(start, end + 1, step))


def run_perf_analyzer(tool: str, url: str, protocol: str, model: str, samples: int, concurrency: str, data: Path,
                      seconds: int, out: Path, extra: tuple[str, ...] = ()) -> tuple[list[Row], str]:
    """perf_analyzer over ``protocol``; one row per concurrency level, and its whole output."""
    report = out.with_suffix(".csv")
    wanted = len(levels(concurrency))
    interval = seconds * 1000 // 3
    for _ in range(3):  # a busy machine may not give three stable windows: longer windows, then give up
        report.unlink(missing_ok=True)
        command = [tool, "-m", model, "-u", url, "-i", protocol, "-b", str(samples), "--input-data", str(data),
                   "--concurrency-range", concurrency, "--measurement-interval", str(interval),
                   "--stability-percentage", "50", "--max-trials", "10", "--percentile", "50", "-f", str(report),
                   *extra]
        result = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
        output = result.stdout + result.stderr
        out.write_text(" ".join(command) + "\n\n" + output)
        if result.returncode == 0 and report.exists() and len(report.read_text().splitlines()) - 1 == wanted:
            break
        interval *= 2
    else:
        print(f"  perf_analyzer ({protocol}, {samples} samples, c{concurrency}) found no stable measurement:"
              f" {out}", flush=True)
    rows = []
    if not report.exists():
        return rows, output
    lines = sorted(csv.DictReader(io.StringIO(report.read_text())), key=lambda line: int(line["Concurrency"]))
    for line in lines:
        rows.append(Row("perf_analyzer", protocol, samples, int(line["Concurrency"]),
                        float(line["Inferences/Second"]) / samples, float(line["p50 latency"]) / 1000,
                        float(line["p99 latency"]) / 1000))
    return rows, output


def statuses(server: GunicornServer) -> tuple[Counter[str], Counter[tuple[str, str, int]]]:
    """Inference statuses by protocol, and calls per (protocol, samples, worker pid), from the access log."""
    found = ACCESS.findall(server.log())
    by_status = Counter(f"{'gRPC' if what.startswith('GRPC') else 'HTTP'} {status}" for _, what, status, _ in found)
    by_worker = Counter(("gRPC" if what.startswith("GRPC") else "HTTP", batch, int(pid))
                        for pid, what, _, batch in found)
    return by_status, by_worker


def shares(by_worker: Counter[tuple[str, str, int]]) -> str:
    """How the calls of each protocol and request size split over the workers, in words."""
    groups: dict[tuple[str, str], list[int]] = {}
    for (protocol, batch, _), count in sorted(by_worker.items()):
        groups.setdefault((protocol, batch), []).append(count)
    return "; ".join(f"{protocol} {batch} sample(s): {' / '.join(f'{c:,}' for c in counts)}"
                     for (protocol, batch), counts in groups.items())


def protocols(args: argparse.Namespace, meta: ModelMetadata, x: np.ndarray, tool: str, out: Path,
              pinned: bool = False) -> dict:
    """Both protocols on one server (its workers pinned to their cores or not): wrk and perf_analyzer rows,
    statuses, the bare model's limit."""
    out.mkdir(parents=True, exist_ok=True)
    cases = bodies(x, meta.input_name)
    data = input_file(out / "samples.json", x, meta.input_name)
    env = {**server_env(args.repo, meta, args.workers), "SERVING_CPU_AFFINITY": "true" if pinned else "false"}
    rows: list[Row] = []
    with GunicornServer(None, out, ["--no-control-socket"], cwd=ROOT, env=env, log_file=out / "server.log") as srv:
        path = f"{srv.url}/v2/models/{meta.name}/infer"
        for samples, connections in ((1, 1), (64, 16)):
            _, body, headers = cases[f"v2 binary|{samples}"]
            (out / f"v2-binary-{samples}.bin").write_bytes(body)
            script = binary_script(out / f"v2-binary-{samples}.lua", out / f"v2-binary-{samples}.bin", headers)
            result: WrkResult = run_wrk(path, script, connections, args.seconds)
            (out / f"wrk-{samples}-c{connections}.txt").write_text(result.raw)
            rows.append(Row("wrk", "HTTP v2 binary", samples, connections, result.requests_per_s, result.p50_ms,
                            result.p99_ms, result.errors))
            print(f"  wrk {samples} samples c{connections}: {rows[-1].samples_per_s:,.0f} samples/s", flush=True)
        grpc_path = f"http://{srv.grpc_target}/inference.GRPCInferenceService/ModelInfer"
        for samples, connections in ((1, 1), (64, 16)):
            _, body, headers = cases[f"v2 binary|{samples}"]
            wire = out / f"grpc-{samples}.bin"
            wire.write_bytes(grpc_body(x[:samples], meta.name, meta.input_name))
            rate, p50, p99, failed = run_h2load(grpc_path, wire, {"content-type": "application/grpc",
                                                                  "te": "trailers"}, connections, args.seconds,
                                                out / f"h2load-grpc-{samples}-c{connections}.txt")
            rows.append(Row("h2load", "gRPC raw", samples, connections, rate, p50, p99, failed))
            print(f"  h2load gRPC {samples} samples c{connections}: {rows[-1].samples_per_s:,.0f} samples/s,"
                  f" p50 {p50:.3f} ms", flush=True)
        http, grpc_url = f"127.0.0.1:{srv.port}", srv.grpc_target
        for protocol, url, samples, levels in (("http", http, 1, "1:8"), ("grpc", grpc_url, 1, "1:8"),
                                               ("http", http, 64, "16"), ("grpc", grpc_url, 64, "12:48:12")):
            found, _ = run_perf_analyzer(tool, url, protocol, meta.name, samples, levels, data, args.seconds,
                                         out / f"perf-analyzer-{protocol}-{samples}.txt")
            for row in found:
                row.protocol = "HTTP v2 binary" if protocol == "http" else "gRPC raw"
            rows += found
            print(f"  perf_analyzer {protocol} {samples} samples: "
                  + ", ".join(f"c{r.concurrency} {r.samples_per_s:,.0f}/s p50 {r.p50_ms:.2f} ms" for r in found),
                  flush=True)
        by_status, by_worker = statuses(srv)
    model_us = protocol_costs({"v2 binary|64": cases["v2 binary|64"]}, meta, "onnx", rounds=300)["v2 binary|64"][1]
    return {"rows": rows, "statuses": by_status, "workers": by_worker,
            "limit": args.workers * 64 / model_us * 1e6, "model_us": model_us}


def placement(args: argparse.Namespace, meta: ModelMetadata, x: np.ndarray, tool: str, out: Path) -> dict:
    """The shipped thread-pool gRPC server against grpc.aio on the ASGI worker's event loop."""
    data = input_file(out / "samples.json", x, meta.input_name)
    results: dict[str, list[Row]] = {}
    for name, app in (("thread pool per worker (shipped)", "asgi_server:app"),
                      ("grpc.aio on the ASGI event loop", "bench.grpc_aio:app")):
        env = {**server_env(args.repo, meta, args.workers), "SERVING_MODE": "threaded", "SERVING_FRONT": "asgi"}
        slug = "aio" if "aio" in name else "threads"
        server = GunicornServer(None, out, ["--no-control-socket"], cwd=ROOT, env=env, app=app,
                                log_file=out / f"placement-{slug}.log")
        if slug == "aio":
            server.env.update(BENCH_AIO_GRPC_BIND=server.grpc_target, SERVING_GRPC_BIND="off")
        rows = []
        with server:
            for samples, concurrency in ((1, "1"), (64, "24")):
                found, _ = run_perf_analyzer(tool, server.grpc_target, "grpc", meta.name, samples, concurrency,
                                             data, args.seconds, out / f"placement-{slug}-{samples}.txt")
                rows += found
            split = shares(statuses(server)[1])
        results[name] = (rows, split)
        print(f"  {name}: " + ", ".join(f"{r.samples} x c{r.concurrency} {r.samples_per_s:,.0f}/s"
                                        f" p50 {r.p50_ms:.2f} ms" for r in rows) + f" ({split})", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mnist-torch", help="a 28x28 MNIST model (train.py --dataset mnist)")
    parser.add_argument("--seconds", type=int, default=6, help="per measurement (perf_analyzer: three windows)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repo", type=Path, default=ROOT / "models")
    parser.add_argument("--skip-placement", action="store_true", help="only the protocols")
    parser.add_argument("--cpu-affinity", choices=("off", "on", "both"), default="both",
                        help="the server as shipped (off), its workers pinned to their cores (on), or one after"
                             " the other (both)")
    args = parser.parse_args()
    meta, x = served_model(args.repo, args.model)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d-%H%M")
    out = ROOT / "reports" / f"grpc-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    tool = perf_analyzer_path()
    measured = {}
    for pinned in {"off": (False,), "on": (True,), "both": (False, True)}[args.cpu_affinity]:
        name = CONFIGURATIONS[pinned]
        print(f"== protocols, {name}: {meta.name} ({'x'.join(map(str, meta.input_shape))})", flush=True)
        measured[name] = protocols(args, meta, x, tool, out / ("pinned" if pinned else "as-shipped"), pinned)
    placed = None if args.skip_placement else placement(args, meta, x, tool, out)
    report = render(args, meta, measured, placed, stamp)
    path = ROOT / "reports" / f"grpc-{stamp}.md"
    save_report(path, report)


MISSING = Row("-", "-", 1, 0, float("nan"), float("nan"), float("nan"))
#: The two servers the protocols run on: as shipped, and with SERVING_CPU_AFFINITY.
CONFIGURATIONS = {False: "as shipped", True: "workers pinned (SERVING_CPU_AFFINITY=true)"}


def _find(rows: list[Row], client: str, protocol: str, samples: int, concurrency: int | None = None) -> Row:
    """The best row of that kind (a row perf_analyzer could not measure stably is missing: NaN)."""
    matches = [r for r in rows if (r.client, r.protocol, r.samples) == (client, protocol, samples)
               and (concurrency is None or r.concurrency == concurrency)]
    return max(matches, key=lambda r: r.samples_per_s) if matches else MISSING


def verdicts(args: argparse.Namespace, measured: dict) -> list[str]:
    """The targets' verdicts on one server's rows."""
    rows: list[Row] = measured["rows"]
    grpc64, wrk64 = _find(rows, "h2load", "gRPC raw", 64, 16), _find(rows, "wrk", "HTTP v2 binary", 64, 16)
    pa_grpc64, pa64 = _find(rows, "perf_analyzer", "gRPC raw", 64), _find(rows, "perf_analyzer", "HTTP v2 binary", 64)
    grpc1, wrk1 = _find(rows, "h2load", "gRPC raw", 1, 1), _find(rows, "wrk", "HTTP v2 binary", 1, 1)
    pa_grpc1, pa_http1 = _find(rows, "perf_analyzer", "gRPC raw", 1, 1), _find(rows, "perf_analyzer",
                                                                                "HTTP v2 binary", 1, 1)
    fraction = grpc64.samples_per_s / measured["limit"]
    failed = {key: count for key, count in measured["statuses"].items() if not key.endswith(" 200")}
    return [
        f"64 samples per request, 16 requests in flight over 16 connections: gRPC {grpc64.samples_per_s:,.0f}"
        f" samples/s (h2load) against HTTP v2 binary {wrk64.samples_per_s:,.0f} (wrk):"
        f" {grpc64.samples_per_s / wrk64.samples_per_s:.2f}x (target >= 1,"
        f" {'met' if grpc64.samples_per_s >= wrk64.samples_per_s else 'NOT met'}). perf_analyzer's own client,"
        f" heavier on the same cores, gives gRPC {pa_grpc64.samples_per_s:,.0f} (c{pa_grpc64.concurrency}) and HTTP"
        f" {pa64.samples_per_s:,.0f} (c16).",
        f"{fraction:.2f} of the bare model's limit ({measured['limit']:,.0f} samples/s: {measured['model_us']:,.0f} us"
        f" per 64-sample call x {args.workers} workers; target >= {LIMIT_TARGET},"
        f" {'met' if fraction >= LIMIT_TARGET else 'NOT met'}).",
        f"1 sample at concurrency 1: gRPC p50 {pa_grpc1.p50_ms:.3f} ms against HTTP v2 binary {pa_http1.p50_ms:.3f} ms"
        f" with the same client (perf_analyzer; target gRPC <= HTTP,"
        f" {'met' if pa_grpc1.p50_ms <= pa_http1.p50_ms else 'NOT met'}); h2load's gRPC p50 {grpc1.p50_ms:.3f} ms"
        f" against wrk's HTTP p50 {wrk1.p50_ms:.3f} ms.",
        "perf_analyzer over HTTP and gRPC at concurrency 1..8 (and 12 to 48): every inference answered 200"
        f" ({', '.join(f'{k}: {v:,}' for k, v in sorted(measured['statuses'].items()))})"
        if not failed else f"FAILED requests: {failed}",
    ]


def render(args: argparse.Namespace, meta: ModelMetadata, measured: dict[str, dict], placed: dict | None,
           stamp: str) -> str:
    lines = [f"# gRPC benchmark, {stamp} UTC", "",
             f"A gunicorn server (-w {args.workers}, process mode, onnx backend, access log, metrics and validation"
             f" on) serving {meta.name} ({'x'.join(map(str, meta.input_shape))}), on the same 2-core machine as the"
             " load generators; requests carry real held-out samples. HTTP v2 binary: the binary tensor extension"
             " both ways. gRPC: `raw_input_contents`. wrk drives HTTP as bench/v2.py does, and h2load (nghttp2's"
             " load generator, a C client as light as wrk) drives gRPC over HTTP/2 with one request in flight per"
             " connection, as wrk does; perf_analyzer (Triton's, scripts/install-perf-analyzer.sh) drives both"
             " protocols with its own C++ client. Each server below runs every row: first as shipped, then (when"
             " measured) with SERVING_CPU_AFFINITY=true, each worker pinned to its own core."]
    for name, found in measured.items():
        lines += ["", f"## Verdicts, {name}", "", *[f"- {verdict}" for verdict in verdicts(args, found)]]
    for name, found in measured.items():
        lines += ["", f"## Rows, {name}", "",
                  "| client | protocol | samples / request | concurrency | req/s | samples/s | p50 ms | p99 ms |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in found["rows"]:
            lines.append(f"| {r.client} | {r.protocol} | {r.samples} | {r.concurrency} | {r.requests_per_s:,.0f} |"
                         f" {r.samples_per_s:,.0f} | {r.p50_ms:.3f} | {r.p99_ms:.3f} |")
        lines += ["", f"Inference requests per worker (access log): {shares(found['workers'])}. The kernel spreads"
                  " gRPC connections, not calls, over the workers, and perf_analyzer puts up to 6 concurrent requests"
                  " on one connection: a split far from even means a worker idled through part of the gRPC rows."]
    if placed:
        lines += ["", "## Placement: thread pool per worker against grpc.aio on the ASGI event loop", "",
                  "SERVING_FRONT=asgi, threaded mode, the same model; perf_analyzer over gRPC.", "",
                  "| placement | samples / request | concurrency | samples/s | p50 ms | p99 ms |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for name, (found, _) in placed.items():
            for r in found:
                lines.append(f"| {name} | {r.samples} | {r.concurrency} | {r.samples_per_s:,.0f} | {r.p50_ms:.3f} |"
                             f" {r.p99_ms:.3f} |")
        lines += [""] + [f"Calls per worker, {name}: {split}." for name, (_, split) in placed.items()]
    return "\n".join(lines) + "\n"



if __name__ == "__main__":
    main()
