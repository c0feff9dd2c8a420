"""How fast gRPC and HTTP can be on this machine at all: the model server against replaying floors, same clients.

    python -m bench.grpc_floor [--model mnist-torch] [--seconds 6] [--workers 2] [--work-us N] [--model-work]
                               [--cpu-affinity]

Issue 25 asks gRPC to beat HTTP v2 binary. This measures how much of the gap is the protocol stacks' own, with
no serving code and no model on either side. Two floors run next to the model server, each with ``--workers``
processes sharing one port, as the server's workers do:

- the gRPC floor: ``grpc.server`` with the front's thread pool and options (serving/fronts/grpc/server.py), one
  generic handler, no deserializer;
- the HTTP floor: a bare WSGI callable under gunicorn's sync workers, as the server's process mode runs.

Each floor *replays* inference: the first time it sees an infer request of a given length (gRPC ModelInfer, HTTP
``POST .../infer``) it forwards it to the model server and keeps the answer's bytes; every later infer request of
that length gets those bytes back, unparsed (the answer to the first sample of that size: the clients do not check
predictions). Everything else (metadata, config, statistics, which perf_analyzer reads between its windows) is
forwarded every time. The clients (wrk and h2load, the lightest of each protocol, and perf_analyzer, one C++ client
for both) therefore get well-formed answers from a floor, and a floor's inference figures are what the protocol
stack, the client and the kernel cost without any of this project's work or the model.

What the verdicts use: a target is out of reach for any gRPC server built on grpcio here when the gRPC floor
alone is slower than the model server's HTTP with the same client; and the share of the bare model's limit a
gRPC server can reach on these cores is bounded by model / (model + the gRPC floor's CPU per call), since the
load generator runs on the same cores (CPU per call of a floor = cores / its calls per second when it keeps
every core busy).

Writes ``reports/grpc-floor-<stamp>.md`` and the raw outputs under ``reports/grpc-floor-<stamp>/``.
"""

from __future__ import annotations

import argparse
import http.client
import multiprocessing
import os
import signal
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from bench.grpc import MISSING, Row, _find, input_file, perf_analyzer_path, run_perf_analyzer, served_model, server_env
from bench.harness import ROOT, grpc_body, run_h2load, run_wrk, save_report
from bench.v2 import binary_script, bodies, protocol_costs
from serving.host.affinity import blocks
from serving.store.repository import ModelMetadata, ModelRepository
from serving.tools.testing import GunicornServer, free_port

SERVICE_PREFIX = "/inference.GRPCInferenceService/"
INFER = SERVICE_PREFIX + "ModelInfer"


# -- the gRPC floor ----------------------------------------------------------------------------------
def busy(seconds: float) -> None:
    """Hold this thread (and the GIL) for ``seconds``, as a model call on the request's thread does."""
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        pass


class ModelWork:
    """The least real work an infer call needs: its tensor read from the wire and the model run on it (the ONNX
    Runtime backend, one math thread), the answer still replayed."""

    def __init__(self, spec: str) -> None:
        from serving.backends import backend_class

        repo, _, name = spec.rpartition(":")
        self.runner = backend_class("onnx")(ModelRepository(Path(repo)).resolve(name), 1)
        self.runner.load()

    def grpc(self, request: bytes) -> None:
        from serving.protocol.v2.proto import grpc_service_pb2 as pb

        message = pb.ModelInferRequest.FromString(request)
        shape = tuple(message.inputs[0].shape)
        self.runner.predict(np.frombuffer(message.raw_input_contents[0], "<f4").reshape(shape))

    def http(self, body: bytes, header_length: int) -> None:
        import orjson

        shape = tuple(orjson.loads(body[:header_length])["inputs"][0]["shape"])
        self.runner.predict(np.frombuffer(body[header_length:], "<f4").reshape(shape))


def grpc_floor_process(port: int, upstream: str, threads: int, ready: Any, work_s: float = 0.0,
                       model: str = "", cpus: tuple[int, ...] = ()) -> None:
    """One floor process: grpc.server on ``port`` (SO_REUSEPORT), every call replayed; pinned to ``cpus`` (as
    SERVING_CPU_AFFINITY pins a worker) when given."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    import grpc

    work = ModelWork(model) if model else None

    channel = grpc.insecure_channel(upstream, options=[("grpc.max_receive_message_length", 64 << 20),
                                                       ("grpc.max_send_message_length", 64 << 20)])
    recorded: dict[tuple[str, int], bytes] = {}

    class Replay(grpc.GenericRpcHandler):
        def service(self, details: Any) -> Any:
            method = details.method

            forward = channel.unary_unary(method)
            if method != INFER:  # metadata, config, statistics: the server's own answer every time

                def passed(request: bytes, context: Any) -> bytes:
                    return forward(request, timeout=30)

                return grpc.unary_unary_rpc_method_handler(passed)

            def answer(request: bytes, context: Any) -> bytes:
                if work_s:
                    busy(work_s)
                if work is not None:
                    work.grpc(request)
                key = len(request)
                found = recorded.get(key)
                if found is None:
                    found = forward(request, timeout=30)
                    recorded[key] = found
                return found

            return grpc.unary_unary_rpc_method_handler(answer)

    server = grpc.server(ThreadPoolExecutor(threads, thread_name_prefix="grpc"),
                         options=[("grpc.so_reuseport", 1), ("grpc.max_receive_message_length", 64 << 20)])
    server.add_generic_rpc_handlers((Replay(),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    ready.set()
    signal.sigwait({signal.SIGTERM})
    server.stop(0)


class GrpcFloor:
    """``workers`` forked floor processes on one port."""

    def __init__(self, upstream: str, workers: int, threads: int, work_s: float = 0.0, model: str = "",
                 pinned: bool = False) -> None:
        self.port = free_port()
        context = multiprocessing.get_context("fork")
        self.processes = []
        cores = blocks(sorted(os.sched_getaffinity(0)), workers)
        for index in range(workers):
            cpus = cores[index % len(cores)] if pinned else ()
            ready = context.Event()
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
            try:
                process = context.Process(target=grpc_floor_process,
                                          args=(self.port, upstream, threads, ready, work_s, model, cpus))
                process.start()
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
            if not ready.wait(30):
                raise SystemExit("the gRPC floor did not start")
            self.processes.append(process)
        self.target = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.join(10)


# -- the HTTP floor ----------------------------------------------------------------------------------
class HttpReplay:
    """A bare WSGI callable: each request's answer recorded from the upstream on first sight, then replayed."""

    def __init__(self, upstream: str, work_s: float = 0.0, model: str = "") -> None:
        self.work_s = work_s
        self.work = ModelWork(model) if model else None
        self.host, _, port = upstream.rpartition(":")
        self.port = int(port)
        self.recorded: dict[tuple[str, str, int], tuple[str, list[tuple[str, str]], bytes]] = {}

    def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        path = environ.get("PATH_INFO", "/") + (f"?{environ['QUERY_STRING']}" if environ.get("QUERY_STRING") else "")
        key = (environ["REQUEST_METHOD"], path, length)
        replayed = environ["REQUEST_METHOD"] == "POST" and path.endswith("/infer")
        if replayed and self.work_s:
            busy(self.work_s)
        if replayed and self.work is not None:
            self.work.http(body, int(environ.get("HTTP_INFERENCE_HEADER_CONTENT_LENGTH") or 0))
        found = self.recorded.get(key) if replayed else None  # the rest: the server's answer every time
        if found is None:
            headers = {name[5:].replace("_", "-").title(): value for name, value in environ.items()
                       if name.startswith("HTTP_") and name not in ("HTTP_HOST", "HTTP_CONNECTION")}
            if environ.get("CONTENT_TYPE"):
                headers["Content-Type"] = environ["CONTENT_TYPE"]
            upstream = http.client.HTTPConnection(self.host, self.port, timeout=30)
            upstream.request(environ["REQUEST_METHOD"], path, body=body, headers=headers)
            reply = upstream.getresponse()
            content = reply.read()
            kept = [(name, value) for name, value in reply.getheaders()
                    if name.lower() in ("content-type", "inference-header-content-length")]
            found = (f"{reply.status} {reply.reason}", [*kept, ("Content-Length", str(len(content)))], content)
            upstream.close()
            if replayed:
                self.recorded[key] = found
        status, headers, content = found
        start_response(status, headers)
        return [content]


def http_floor_app() -> HttpReplay:
    """gunicorn's app factory: ``bench.grpc_floor:http_floor_app()`` with GRPC_FLOOR_UPSTREAM=host:port."""
    return HttpReplay(os.environ["GRPC_FLOOR_UPSTREAM"], float(os.environ.get("GRPC_FLOOR_WORK_S") or 0),
                      os.environ.get("GRPC_FLOOR_MODEL", ""))


def start_http_floor(upstream: str, workers: int, out: Path, work_s: float = 0.0, model: str = "") -> tuple[Any, str]:
    import subprocess

    port = free_port()
    env = {**os.environ, "GRPC_FLOOR_UPSTREAM": upstream, "GRPC_FLOOR_WORK_S": str(work_s), "GRPC_FLOOR_MODEL": model,
           "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "gunicorn", "-w", str(workers), "-b", f"127.0.0.1:{port}",
                                "--access-logfile", "-", "--log-level", "warning", "--access-logformat", "%(s)s",
                                "bench.grpc_floor:http_floor_app()"], cwd=ROOT, env=env,
                               stdout=(out / "http-floor.log").open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("the HTTP floor did not start")


# -- the runs ----------------------------------------------------------------------------------------
@dataclass
class Target:
    """Where one protocol is served: the model server or a floor."""

    server: str
    http: str | None
    grpc: str | None


def drive(target: Target, meta: ModelMetadata, x: np.ndarray, tool: str, seconds: int, out: Path) -> list[Row]:
    """wrk (HTTP) and h2load (gRPC) at 1 sample c1 and 64 samples c16; perf_analyzer at 1 sample c1 and 64
    samples c16 (HTTP) / c12 (gRPC, 2 connections)."""
    cases = bodies(x, meta.input_name)
    data = input_file(out / "samples.json", x, meta.input_name)
    slug = target.server.replace(" ", "-")
    rows: list[Row] = []
    for samples, connections in ((1, 1), (64, 16)):
        if target.http:
            _, body, headers = cases[f"v2 binary|{samples}"]
            (out / f"v2-binary-{samples}.bin").write_bytes(body)
            script = binary_script(out / f"v2-binary-{samples}.lua", out / f"v2-binary-{samples}.bin", headers)
            url = f"http://{target.http}/v2/models/{meta.name}/infer"
            run_wrk(url, script, connections, 1)  # the floor records its answer; everyone warms up
            result = run_wrk(url, script, connections, seconds)
            (out / f"{slug}-wrk-{samples}.txt").write_text(result.raw)
            rows.append(Row("wrk", "HTTP v2 binary", samples, connections, result.requests_per_s, result.p50_ms,
                            result.p99_ms, result.errors))
        if target.grpc:
            wire = out / f"grpc-{samples}.bin"
            wire.write_bytes(grpc_body(x[:samples], meta.name, meta.input_name))
            rate, p50, p99, failed = run_h2load(f"http://{target.grpc}{SERVICE_PREFIX}ModelInfer", wire,
                                                {"content-type": "application/grpc", "te": "trailers"}, connections,
                                                seconds, out / f"{slug}-h2load-{samples}.txt")
            rows.append(Row("h2load", "gRPC raw", samples, connections, rate, p50, p99, failed))
    for protocol, address in (("http", target.http), ("grpc", target.grpc)):
        if not address:
            continue
        for samples, levels in ((1, "1"), (64, "16" if protocol == "http" else "12")):
            # the version named: left empty, perf_analyzer looks for the one whose server-side counts grew in
            # its window, and a floor's replayed answers grow none
            found, _ = run_perf_analyzer(tool, address, protocol, meta.name, samples, levels, data, seconds,
                                         out / f"{slug}-perf-analyzer-{protocol}-{samples}.txt",
                                         ("-x", str(meta.version)))
            for row in found:
                row.protocol = "HTTP v2 binary" if protocol == "http" else "gRPC raw"
            rows += found
    for row in rows:
        print(f"  {target.server}: {row.client} {row.protocol} {row.samples} x c{row.concurrency}:"
              f" {row.requests_per_s:,.0f} req/s, p50 {row.p50_ms:.3f} ms, errors {row.errors}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mnist-torch", help="a 28x28 MNIST model (train.py --dataset mnist)")
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repo", type=Path, default=ROOT / "models")
    parser.add_argument("--reports", type=Path, default=ROOT / "reports")
    parser.add_argument("--work-us", type=float, default=0.0,
                        help="the floors also hold each infer call's thread this long (the model call's cost)")
    parser.add_argument("--model-work", action="store_true",
                        help="the floors also read each infer call's tensor and run the model on it (ONNX Runtime)")
    parser.add_argument("--cpu-affinity", action="store_true",
                        help="the model server with SERVING_CPU_AFFINITY=true and the gRPC floor's processes pinned the"
                             " same way (the HTTP floor stays unpinned)")
    args = parser.parse_args()
    meta, x = served_model(args.repo, args.model)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d-%H%M")
    out = args.reports / f"grpc-floor-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    tool = perf_analyzer_path()
    env = {**server_env(args.repo, meta, args.workers), "SERVING_CPU_AFFINITY": str(args.cpu_affinity).lower()}
    rows: dict[str, list[Row]] = {}
    with GunicornServer(None, out, ["--no-control-socket"], cwd=ROOT, env=env, log_file=out / "server.log") as srv:
        http_address = f"127.0.0.1:{srv.port}"
        threads = 2  # the front's pool in process mode: max(2, threads per worker), one request per worker
        rows["model server"] = drive(Target("model server", http_address, srv.grpc_target), meta, x, tool,
                                     args.seconds, out)
        model = f"{args.repo}:{meta.name}" if args.model_work else ""
        floor = GrpcFloor(srv.grpc_target, args.workers, threads, args.work_us / 1e6, model, args.cpu_affinity)
        try:
            rows["gRPC floor"] = drive(Target("gRPC floor", None, floor.target), meta, x, tool, args.seconds, out)
        finally:
            floor.stop()
        process, address = start_http_floor(http_address, args.workers, out, args.work_us / 1e6, model)
        try:
            rows["HTTP floor"] = drive(Target("HTTP floor", address, None), meta, x, tool, args.seconds, out)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(30)
    cases = bodies(x, meta.input_name)
    model_us = protocol_costs({"v2 binary|64": cases["v2 binary|64"]}, meta, "onnx", rounds=300)["v2 binary|64"][1]
    report = render(args, meta, rows, model_us, os.cpu_count() or 1, stamp)
    path = args.reports / f"grpc-floor-{stamp}.md"
    save_report(path, report)


def _row(rows: list[Row], client: str, protocol: str, samples: int) -> Row | None:
    """bench.grpc's ``_find`` (the best row of that kind), None where there is none."""
    found = _find(rows, client, protocol, samples)
    return None if found is MISSING else found


def render(args: argparse.Namespace, meta: ModelMetadata, rows: dict[str, list[Row]], model_us: float, cores: int,
           stamp: str) -> str:
    server, grpc_floor, http_floor = rows["model server"], rows["gRPC floor"], rows["HTTP floor"]
    lines = [
        f"# gRPC and HTTP floors, {stamp} UTC",
        "",
        f"`python -m bench.grpc_floor --seconds {args.seconds} --workers {args.workers}"
        + (f" --work-us {args.work_us:g}" if args.work_us else "")
        + (" --model-work" if args.model_work else "")
        + (" --cpu-affinity" if args.cpu_affinity else "")
        + f"` on {cores} cores: the model"
        f" server (gunicorn -w {args.workers}, process mode, onnx backend, {meta.name}, real t10k samples, access log,"
        " metrics and validation on) and two replaying floors, each with the same number of processes on one port:"
        " grpc.server with the front's thread pool and options, and a bare WSGI callable under gunicorn's sync"
        " workers. A floor forwards a request it has not seen to the model server once and replays the answer's"
        " bytes ever after: no parsing, no model, no serving code"
        + (f" (but each floor holds every infer call's thread for {args.work_us:g} us, as a model call would)"
           if args.work_us else "")
        + (" (but each floor reads every infer call's tensor and runs the model on it, one math thread)"
           if args.model_work else "")
        + (". The model server runs with SERVING_CPU_AFFINITY=true and the gRPC floor's processes are pinned the same"
           " way, one block of cores each (the HTTP floor is not)" if args.cpu_affinity else "")
        + ". The clients run on the same cores.",
        "",
        "| server | client | protocol | samples | concurrency | req/s | samples/s | p50 ms | p99 ms | errors |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, found in rows.items():
        for r in found:
            lines.append(f"| {name} | {r.client} | {r.protocol} | {r.samples} | {r.concurrency} |"
                         f" {r.requests_per_s:,.0f} | {r.samples_per_s:,.0f} | {r.p50_ms:.3f} | {r.p99_ms:.3f} |"
                         f" {r.errors} |")
    lines += ["", "## Verdicts", ""]
    pa_floor1 = _row(grpc_floor, "perf_analyzer", "gRPC raw", 1)
    pa_grpc1 = _row(server, "perf_analyzer", "gRPC raw", 1)
    pa_http1 = _row(server, "perf_analyzer", "HTTP v2 binary", 1)
    h2_floor1, wrk_http1 = _row(grpc_floor, "h2load", "gRPC raw", 1), _row(server, "wrk", "HTTP v2 binary", 1)
    if pa_floor1 and pa_http1 and pa_grpc1:
        lines.append(
            f"- One sample at concurrency 1, perf_analyzer for both: the model server's gRPC p50 {pa_grpc1.p50_ms:.3f}"
            f" ms, its HTTP v2 binary p50 {pa_http1.p50_ms:.3f} ms, and the gRPC floor alone {pa_floor1.p50_ms:.3f}"
            f" ms: grpcio's own stack{' running the model' if args.model_work else ''} is"
            f" {'slower' if pa_floor1.p50_ms > pa_http1.p50_ms else 'faster'} than the whole HTTP path with the model"
            + (" (no grpcio server can meet the target here)." if pa_floor1.p50_ms > pa_http1.p50_ms else
               f"; the server's own gRPC work is {pa_grpc1.p50_ms - pa_floor1.p50_ms:.3f} ms over the floor."))
    if h2_floor1 and wrk_http1:
        lines.append(f"- The same with each protocol's lightest client: the gRPC floor's p50 (h2load)"
                     f" {h2_floor1.p50_ms:.3f} ms against the model server's HTTP (wrk) {wrk_http1.p50_ms:.3f} ms.")
    h2_floor64, wrk_http64 = _row(grpc_floor, "h2load", "gRPC raw", 64), _row(server, "wrk", "HTTP v2 binary", 64)
    h2_grpc64 = _row(server, "h2load", "gRPC raw", 64)
    http_floor64 = _row(http_floor, "wrk", "HTTP v2 binary", 64)
    pa_floor64 = _row(grpc_floor, "perf_analyzer", "gRPC raw", 64)
    pa_http64 = _row(server, "perf_analyzer", "HTTP v2 binary", 64)
    limit = args.workers * 64 / model_us * 1e6
    if args.model_work and h2_floor64 and wrk_http64 and h2_grpc64:
        # the floor ran the model: its samples/s bound any grpcio server's directly
        lines.append(
            f"- 64 samples (the bare limit {limit:,.0f} samples/s: {model_us:,.0f} us per model call on each of"
            f" {args.workers} workers): the gRPC floor, which reads the tensor and runs the model but validates and"
            f" encodes nothing, serves {h2_floor64.samples_per_s:,.0f} samples/s with h2load,"
            f" {h2_floor64.samples_per_s / limit:.3f} of the limit (target 0.8) and"
            f" {h2_floor64.samples_per_s / wrk_http64.samples_per_s:.3f}x the model server's HTTP with wrk"
            f" ({wrk_http64.samples_per_s:,.0f}); the model server's gRPC {h2_grpc64.samples_per_s:,.0f}"
            f" ({h2_grpc64.samples_per_s / limit:.3f} of the limit,"
            f" {h2_grpc64.samples_per_s / wrk_http64.samples_per_s:.3f}x HTTP)."
            + (
                f" With perf_analyzer for both: the floor {pa_floor64.samples_per_s:,.0f}"
                f" ({pa_floor64.samples_per_s / limit:.3f} of the limit), the server's HTTP"
                f" {pa_http64.samples_per_s:,.0f} ({pa_floor64.samples_per_s / pa_http64.samples_per_s:.3f}x)."
                if pa_floor64 and pa_http64
                else ""
            )
        )
    elif h2_floor64 and wrk_http64 and h2_grpc64:
        floor_cpu_us = cores / h2_floor64.requests_per_s * 1e6
        http_cpu_us = cores / wrk_http64.requests_per_s * 1e6
        bound = model_us / (model_us + floor_cpu_us)
        lines += [
            f"- 64 samples: the model call is {model_us:,.0f} us (one math thread; the bare limit"
            f" {limit:,.0f} samples/s at {args.workers} workers). The gRPC floor with h2load keeps the cores busy at"
            f" {h2_floor64.requests_per_s:,.0f} calls/s, {floor_cpu_us:,.0f} us of CPU per call for grpcio and its"
            f" client; the model server's whole HTTP call with wrk costs {http_cpu_us:,.0f} us of CPU, model"
            f" included, so {http_cpu_us - model_us:,.0f} us outside the model"
            + (f" (the HTTP floor: {cores / http_floor64.requests_per_s * 1e6:,.0f} us)." if http_floor64 else "."),
            f"- Bound on the share of the bare limit a grpcio server reaches here with h2load on the same cores:"
            f" model / (model + gRPC floor) = {bound:.2f} (target 0.8); measured {h2_grpc64.samples_per_s / limit:.2f}"
            f" (HTTP with wrk: {wrk_http64.samples_per_s / limit:.2f}).",
            f"- Against HTTP v2 binary at 64 samples: the gRPC floor's CPU per call is {floor_cpu_us:,.0f} us against"
            f" {http_cpu_us - model_us:,.0f} us for the model server's whole HTTP path outside the model, so gRPC with"
            f" the model costs at least {model_us + floor_cpu_us:,.0f} us per call against HTTP's {http_cpu_us:,.0f}:"
            f" at most {http_cpu_us / (model_us + floor_cpu_us):.2f}x HTTP's samples/s (measured"
            f" {h2_grpc64.samples_per_s / wrk_http64.samples_per_s:.2f}x).",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
