"""What tracing, payload logs and drift cost on the request path, and that they cost nothing when off.

Serves digits-torch through ONNX Runtime (threaded and batched modes, 2 workers) and drives `POST /predict`
with one 8x8 sample per request using wrk on 127.0.0.1, in these configurations, interleaved round by round
so that each is compared with the "off" run of its own round:

- off: tracing, payload logs and drift off (the default);
- before (with ``--before PATH``): the same server from another checkout, e.g. main before this work
  (``git worktree add /tmp/before main``), so "off" is compared with the code that had none of it;
- tracing 1%: ``SERVING_TRACING=true``, ``OTEL_TRACES_SAMPLER=traceidratio``, ``OTEL_TRACES_SAMPLER_ARG=0.01``;
- tracing 100%: the SDK's default sampler (every request), every span exported over OTLP/HTTP to a receiver
  in this process (``serving.tools.receivers``, decoding nothing while wrk runs);
- payloads 1% / payloads 100%: ``SERVING_PAYLOAD_LOG`` to a file at those rates;
- drift: ``SERVING_DRIFT=true`` (the model's reference statistics, a window folded once a second).

A second table times the same request in process, with no HTTP server and no load generator (the WSGI
app called directly, 2,000 calls per round, the fastest of 5 rounds, each configuration in a fresh
subprocess): what each configuration adds to one request's CPU time, which a loaded 2-core machine blurs
less than a throughput figure.

Writes ``reports/tracing-<date>.md`` (and the raw wrk output under ``reports/tracing-<date>/``):

    python -m bench.tracing                         # 10 s per run, 3 rounds
    python -m bench.tracing --seconds 3 --rounds 1  # a smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.harness import ROOT, WrkResult, digits_script, model_server, parse_fronts, run_wrk, save_report
from serving.tools.receivers import Receiver

MODES = ("threaded", "batched")


def configurations(receiver_url: str, out_dir: Path, before: Path | None) -> list[tuple[str, dict[str, Any]]]:
    """(label, settings and environment) of every configuration; ``env`` holds the OTEL_* variables."""
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver_url}
    configs: list[tuple[str, dict[str, Any]]] = [("off", {})]
    if before is not None:
        configs.append(("before", {"cwd": before, "env": {"PYTHONPATH": str(before)}}))
    configs += [
        ("tracing 1%", {"tracing": "true", "env": {**otel, "OTEL_TRACES_SAMPLER": "traceidratio",
                                                     "OTEL_TRACES_SAMPLER_ARG": "0.01"}}),
        ("tracing 100%", {"tracing": "true", "env": otel}),
        ("payloads 1%", {"payload_log": str(out_dir / "payloads-1.jsonl"), "payload_log_rate": "0.01"}),
        ("payloads 100%", {"payload_log": str(out_dir / "payloads-100.jsonl")}),
        ("drift", {"drift": "true"}),
    ]
    return configs


IN_PROCESS = r"""
import io, json, os, sys, time
repo, tracing, rate, payloads = sys.argv[1], sys.argv[2] == "1", sys.argv[3], sys.argv[4]
os.environ["OTEL_TRACES_EXPORTER"] = "none"
if rate != "1":
    os.environ["OTEL_TRACES_SAMPLER"], os.environ["OTEL_TRACES_SAMPLER_ARG"] = "traceidratio", rate
from serving.config import Settings
from serving.fronts.wsgi import create_app, service_of
app = create_app(Settings(model_repository=repo, model="digits-torch", backend="onnx", mode="threaded",
                          tracing=tracing, payload_log=payloads, access_log=False))
service_of(app).model()
data = json.loads(open(os.path.join(repo, "digits-torch", "1", "sample.json")).read())["data"]
body = json.dumps({"data": data}).encode()
def call():
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/predict", "CONTENT_TYPE": "application/json",
               "CONTENT_LENGTH": str(len(body)), "wsgi.input": io.BytesIO(body), "HTTP_HOST": "localhost"}
    out = app.wsgi_app(environ, lambda status, headers, exc_info=None: None)
    getattr(out, "close", lambda: None)()
for _ in range(500):
    call()
rounds = []
for _ in range(5):
    started = time.perf_counter()
    for _ in range(2000):
        call()
    rounds.append((time.perf_counter() - started) / 2000 * 1e6)
print(min(rounds))
"""
IN_PROCESS_CONFIGS = (("off", "0", "1", ""), ("tracing 1% (spans not exported)", "1", "0.01", ""),
                      ("tracing 100% (spans not exported)", "1", "1", ""),
                      ("payloads 100% (to /dev/null)", "0", "1", "/dev/null"))


def in_process(repo: Path) -> list[tuple[str, float]]:
    """Microseconds per request of each configuration, the WSGI app called in process."""
    import subprocess
    import sys

    results = []
    for label, tracing, rate, payloads in IN_PROCESS_CONFIGS:
        print(f"in process: {label} ...", flush=True)
        output = subprocess.run([sys.executable, "-c", IN_PROCESS, str(repo), tracing, rate, payloads], cwd=ROOT,
                                capture_output=True, text=True, timeout=600, check=True).stdout
        results.append((label, float(output.split()[-1])))
        print(f"  {results[-1][1]:.1f} us per request", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10, help="wrk duration per run")
    parser.add_argument("--connections", type=int, default=32, help="concurrent wrk connections")
    parser.add_argument("--rounds", type=int, default=3, help="runs of every configuration")
    parser.add_argument("--fronts", default="wsgi", help="comma-separated fronts (wsgi, asgi)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated modes")
    parser.add_argument("--only", default="", help="comma-separated substrings of configuration labels to run")
    parser.add_argument("--before", type=Path, default=None, help="a checkout to serve the 'before' row from")
    parser.add_argument("--repo", type=Path, default=ROOT / "models", help="model repository (digits-torch)")
    parser.add_argument("--reports", type=Path, default=ROOT / "reports", help="where the report goes")
    args = parser.parse_args()
    if not (args.repo / "digits-torch").is_dir():
        raise SystemExit(f"no digits-torch in {args.repo}: run python train.py")
    fronts = parse_fronts(args.fronts)
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    stamp = datetime.now(UTC).strftime("%Y-%m-%d-%H%M")
    out_dir = args.reports / f"tracing-{stamp}"
    out_dir.mkdir(parents=True, exist_ok=True)
    script = digits_script(out_dir)
    common = ["-w", "2", "--backlog", "2048", "--timeout", "30", "--no-control-socket"]
    results: dict[tuple[str, str, str], list[tuple[WrkResult, float]]] = {}
    with Receiver() as receiver:
        configs = [c for c in configurations(receiver.url, out_dir, args.before)
                   if c[0] == "off" or not args.only or any(s in c[0] for s in args.only.split(","))]
        for round_number in range(1, args.rounds + 1):
            for front in fronts:
                for mode in modes:
                    off: WrkResult | None = None
                    for label, extra in configs:
                        settings = dict(extra)
                        env = {**settings.pop("env", {}), "OTEL_BSP_MAX_QUEUE_SIZE": "65536"}
                        cwd = settings.pop("cwd", None)
                        slug = f"{label.replace(' ', '-').replace('%', '')}-{front}-{mode}-r{round_number}"
                        print(f"round {round_number}: {label}, {front}, {mode} ...", flush=True)
                        server = model_server(front, args.repo, out_dir, slug, common, model="digits-torch",
                                              backend="onnx", mode=mode, workers=2, env=env, **settings)
                        if cwd is not None:
                            server.cwd = Path(cwd)
                        with server:
                            result = run_wrk(server.url + "/predict", script, args.connections, args.seconds)
                        (out_dir / f"{slug}.txt").write_text(result.raw)
                        off = result if label == "off" else off
                        ratio = result.requests_per_s / off.requests_per_s if off else 1.0
                        results.setdefault((label, front, mode), []).append((result, ratio))
                        print(f"  {result.requests_per_s:,.0f} req/s ({ratio:.3f} of off), p99 {result.p99_ms:.2f} ms,"
                              f" errors {result.errors}", flush=True)
        spans = len(receiver.posts("/v1/traces"))
    report = render(results, args, stamp, spans, in_process(args.repo))
    path = args.reports / f"tracing-{stamp}.md"
    save_report(path, report)


def render(results: dict[tuple[str, str, str], list[tuple[WrkResult, float]]], args: argparse.Namespace,
           stamp: str, exports: int, per_request: list[tuple[str, float]]) -> str:
    lines = [
        f"# Tracing, payload logs and drift: cost on the request path ({stamp} UTC)",
        "",
        f"`python -m bench.tracing --seconds {args.seconds} --rounds {args.rounds} --fronts {args.fronts}"
        f" --modes {args.modes}`{' --before ' + str(args.before) if args.before else ''}; wrk -t2"
        f" -c{args.connections} on 127.0.0.1, `POST /predict` with one 8x8 digits sample; digits-torch through"
        f" ONNX Runtime, 2 workers; {os.cpu_count()} cores. Each configuration is compared with the `off` run of"
        f" its own round (ratio of requests/s); the median over {args.rounds} rounds. The OTLP receiver took"
        f" {exports} export requests.",
        "",
        "| configuration | front | mode | req/s (median) | ratio to off (median) | ratios per round | p99 ms"
        " (median) | errors |",
        "| --- | --- | --- | ---: | ---: | --- | ---: | ---: |",
    ]
    for (label, front, mode), runs in results.items():
        rps = statistics.median(r.requests_per_s for r, _ in runs)
        ratio = statistics.median(x for _, x in runs)
        p99 = statistics.median(r.p99_ms for r, _ in runs)
        errors = sum(r.errors for r, _ in runs)
        per_round = ", ".join(f"{x:.3f}" for _, x in runs)
        lines.append(f"| {label} | {front} | {mode} | {rps:,.0f} | {ratio:.3f} | {per_round} | {p99:.2f} |"
                     f" {errors} |")
    base = per_request[0][1]
    lines += [
        "",
        "One request in process (the WSGI app called directly, no HTTP, no load generator; the fastest of 5"
        " rounds of 2,000 calls; each configuration in a fresh process):",
        "",
        "| configuration | us per request | added |",
        "| --- | ---: | ---: |",
        *(f"| {label} | {us:.1f} | {us - base:+.1f} |" for label, us in per_request),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
