"""Process vs threaded vs batched mode on the heavy ``large`` model, across client concurrency, on both fronts.

    python -m bench.batching [--seconds 8] [--concurrency 1,8,32,64] [--backends pytorch,onnx,tensorflow]
                             [--fronts wsgi,asgi]

Trains ``digits-large-tf`` / ``digits-large-torch`` with ``train.py --arch large`` if they are missing,
then for each backend, mode and front starts gunicorn (-w 2, as shipped; the fronts of a mode back to
back) and drives ``POST /predict`` (one sample per request) with wrk at each concurrency. Writes
``reports/batching-<stamp>.md`` with a table, the targets, and a PNG chart of throughput against p99
latency per mode and front.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from bench.harness import ROOT, WrkResult, digits_script, model_server, parse_fronts, run_wrk, save_report

MODELS = {"pytorch": "digits-large-torch", "onnx": "digits-large-torch", "tensorflow": "digits-large-tf"}
MODES = {"pytorch": ["process", "batched"], "onnx": ["process", "threaded", "batched"],
         "tensorflow": ["process", "threaded", "batched"]}
Row = tuple[str, str, str, int, WrkResult]  # backend, mode, front, concurrency, what wrk measured


def ensure_large_models(repo: Path, backends: list[str]) -> None:
    for framework, name in (("pytorch", "digits-large-torch"), ("tensorflow", "digits-large-tf")):
        needed = any(MODELS[b] == name for b in backends)
        if needed and not (repo / name).is_dir():
            print(f"training {name} (train.py --arch large --framework {framework}) ...", flush=True)
            subprocess.run([sys.executable, "train.py", "--dataset", "digits", "--arch", "large", "--framework",
                            framework, "--out", str(repo)], cwd=ROOT, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument("--backends", default="pytorch,onnx,tensorflow")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4, help="request threads per worker in threaded mode")
    parser.add_argument("--repo", type=Path, default=ROOT / "models")
    parser.add_argument("--fronts", default="wsgi,asgi", help="comma-separated fronts to run every mode on")
    parser.add_argument("--reports", type=Path, default=ROOT / "reports", help="where the report and raw output go")
    parser.add_argument("--no-head-to-head", action="store_true", help="skip the alternating c=1 runs (WSGI)")
    args = parser.parse_args()
    backends = args.backends.split(",")
    levels = [int(c) for c in args.concurrency.split(",")]
    fronts = parse_fronts(args.fronts)
    ensure_large_models(args.repo, backends)

    stamp = datetime.now(UTC).strftime("%Y-%m-%d-%H%M")
    out_dir = args.reports / f"batching-{stamp}"
    out_dir.mkdir(parents=True, exist_ok=True)
    script = digits_script(out_dir)
    rows: list[Row] = []
    for backend in backends:
        for mode in MODES[backend]:
            for front in fronts:
                threads = {"threads": args.threads} if mode == "threaded" else {}  # else the mode's default
                slug = f"{backend}-{mode}-{front}"
                with model_server(front, args.repo, out_dir, slug, model=MODELS[backend], backend=backend, mode=mode,
                                  workers=args.workers, access_log="true", **threads) as server:
                    for level in levels:
                        result = run_wrk(server.url + "/predict", script, level, args.seconds)
                        (out_dir / f"{slug}-c{level}.txt").write_text(result.raw)
                        rows.append((backend, mode, front, level, result))
                        print(f"{backend:10} {mode:9} {front} c={level:<3} {result.requests_per_s:8,.0f} samples/s"
                              f"  p50 {result.p50_ms:7.2f} ms  p99 {result.p99_ms:7.2f} ms  errors {result.errors}",
                              flush=True)
    solo = {} if args.no_head_to_head or "wsgi" not in fronts else head_to_head(backends, args, out_dir, script)
    chart = out_dir / "throughput-vs-p99.png"
    draw(rows, backends, chart)
    report = render(rows, backends, levels, args, stamp, chart, solo)
    path = args.reports / f"batching-{stamp}.md"
    save_report(path, report)


def head_to_head(backends: list[str], args: argparse.Namespace, out_dir: Path, script: Path
                 ) -> dict[str, tuple[list[float], list[float]]]:
    """One client, WSGI front: process and batched servers up side by side, wrk runs alternating, 3 rounds each.

    A single client is the most noise-sensitive case on a shared machine, so the two modes are
    measured in alternation rather than minutes apart.
    """
    solo: dict[str, tuple[list[float], list[float]]] = {}
    for backend in backends:
        servers = {}
        with contextlib.ExitStack() as stack:
            for mode in ("process", "batched"):
                servers[mode] = stack.enter_context(model_server(
                    "wsgi", args.repo, out_dir, f"solo-{backend}-{mode}", model=MODELS[backend], backend=backend,
                    mode=mode, workers=args.workers))
            runs: dict[str, list[float]] = {"process": [], "batched": []}
            for _ in range(3):
                for mode, server in servers.items():
                    runs[mode].append(run_wrk(server.url + "/predict", script, 1, args.seconds).requests_per_s)
        solo[backend] = (runs["process"], runs["batched"])
        print(f"{backend:10} c=1 alternating: process {runs['process']}, batched {runs['batched']}", flush=True)
    return solo


def draw(rows: list[Row], backends: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(backends), figsize=(5 * len(backends), 4.2), squeeze=False)
    for ax, backend in zip(axes[0], backends, strict=True):
        for number, mode in enumerate(MODES[backend]):
            for front in dict.fromkeys(f for b, m, f, _, _ in rows if b == backend and m == mode):
                points = [(r.p99_ms, r.requests_per_s, c) for b, m, f, c, r in rows
                          if (b, m, f) == (backend, mode, front)]
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{mode} {front}",
                        color=f"C{number}", linestyle="--" if front == "asgi" else "-")
                for p99, rps, level in points:
                    ax.annotate(f"c{level}", (p99, rps), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_title(f"{backend} ({MODELS[backend]})")
        ax.set_xlabel("p99 latency (ms)")
        ax.set_ylabel("samples/s")
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def render(rows: list[Row], backends: list[str], levels: list[int],
           args: argparse.Namespace, stamp: str, chart: Path,
           solo: dict[str, tuple[list[float], list[float]]]) -> str:
    lines = [
        f"# Batching benchmark, {stamp} UTC", "",
        f"`POST /predict` with one sample per request (so samples/s = requests/s), wrk -d{args.seconds}s on"
        f" 127.0.0.1, gunicorn -w {args.workers}, the `large` model (train.py --arch large), default batching"
        f" settings, access log on. Fronts: {args.fronts} (`asgi`: SERVING_FRONT=asgi, `asgi_server:app` under"
        " the ASGI worker gunicorn.conf.py picks, the same mode's threads as its pool), each mode's fronts back to"
        " back; `ASGI / WSGI` compares the two at the same backend, mode and concurrency.", "",
        f"![throughput vs p99]({chart.relative_to(args.reports)})", "",
        "| backend | mode | front | concurrency | samples/s | p50 ms | p99 ms | errors | ASGI / WSGI |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    index = {(b, m, f, c): r for b, m, f, c, r in rows}
    for backend, mode, front, level, r in rows:
        wsgi = index.get((backend, mode, "wsgi", level))
        versus = f"{r.requests_per_s / wsgi.requests_per_s:.2f}" if front == "asgi" and wsgi else ""
        lines.append(f"| {backend} | {mode} | {front} | {level} | {r.requests_per_s:,.0f} | {r.p50_ms:.2f}"
                     f" | {r.p99_ms:.2f} | {r.errors} | {versus} |")
    lines += ["", "## Targets", "", "Batched against process mode on the WSGI front, then batched ASGI against"
              " batched WSGI.", "",
              "| backend | check | batched | against | ratio | met |", "| --- | --- | ---: | ---: | ---: | --- |"]
    for backend in backends:
        for level in levels:
            batched = index.get((backend, "batched", "wsgi", level))
            process = index.get((backend, "process", "wsgi", level))
            if batched is None or process is None:
                continue
            ratio = batched.requests_per_s / process.requests_per_s
            if level >= 32:
                met = ratio >= 1.5 and batched.p99_ms <= process.p99_ms
                check = f"c={level}: samples/s >= 1.5x, p99 <= process"
                detail = f"{batched.requests_per_s:,.0f} (p99 {batched.p99_ms:.1f})"
                base = f"{process.requests_per_s:,.0f} (p99 {process.p99_ms:.1f})"
            elif level == 1 and backend in solo:  # the alternating measurement, medians of 3 runs each
                process_runs, batched_runs = solo[backend]
                ratio = statistics.median(batched_runs) / statistics.median(process_runs)
                met = ratio >= 0.9
                check = "c=1 (alternating runs, medians of 3): costs <= 10% throughput"
                detail = f"{statistics.median(batched_runs):,.0f}"
                base = f"{statistics.median(process_runs):,.0f}"
            else:
                continue
            lines.append(f"| {backend} | {check} | {detail} | {base} | {ratio:.2f} | {'yes' if met else 'NO'} |")
    for backend in backends:  # issue 16: the ASGI front keeps what batching gains under concurrency
        for level in (level for level in levels if level >= 32):
            asgi, wsgi = index.get((backend, "batched", "asgi", level)), index.get((backend, "batched", "wsgi", level))
            if asgi is None or wsgi is None:
                continue
            ratio = asgi.requests_per_s / wsgi.requests_per_s
            met = ratio >= 1.0 and not asgi.errors
            lines.append(f"| {backend} | c={level}: batched ASGI samples/s >= batched WSGI | {asgi.requests_per_s:,.0f}"
                         f" | {wsgi.requests_per_s:,.0f} | {ratio:.2f} | {'yes' if met else 'NO'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
