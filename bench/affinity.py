"""SERVING_CPU_AFFINITY on the request path: a checkout of earlier code, this code, and this code pinned.

    python -m bench.affinity --before /path/to/checkout [--mode process|threaded] [--rounds 3] [--seconds 5]

gunicorn ``-w 2``, ONNX Runtime serving ``digits-tf``, wrk ``-c32`` on ``POST /predict`` with one 8x8 digits
sample after a 1 s warm-up. Three servers alternate in every round on the same machine: *before* (the checkout,
run from its own directory with its own ``serving`` on PYTHONPATH), *after* (this code as shipped) and *after,
pinned* (``SERVING_CPU_AFFINITY=true``). Writes ``reports/affinity-<stamp>.md`` and the raw wrk output under
``reports/affinity-<stamp>/``.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path

from bench.harness import ROOT, digits_script, run_wrk
from serving.tools.testing import GunicornServer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="a checkout of the code to compare against")
    parser.add_argument("--mode", default="process", choices=("process", "threaded"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--reports", type=Path, default=ROOT / "reports")
    args = parser.parse_args()
    stamp = datetime.now(UTC).strftime("%Y-%m-%d-%H%M")
    out = args.reports / f"affinity-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    script = digits_script(out)
    common = ["-w", "2", "--backlog", "2048", "--timeout", "30", "--no-control-socket"]
    configs = {"before": (args.before.resolve(), {}), "after": (ROOT, {}),
               "after, pinned": (ROOT, {"SERVING_CPU_AFFINITY": "true"})}
    rates: dict[str, list[float]] = {name: [] for name in configs}
    for round_ in range(args.rounds):
        for name, (cwd, extra) in configs.items():
            slug = f"{name.replace(', ', '-')}-{round_}"
            env = {"SERVING_MODEL_REPOSITORY": str(ROOT / "models"), "SERVING_MODEL": "digits-tf",
                   "SERVING_BACKEND": "onnx", "SERVING_MODE": args.mode, "PYTHONPATH": str(cwd), **extra}
            with GunicornServer(None, out, common, cwd=cwd, env=env, log_file=out / f"{slug}.log") as server:
                run_wrk(server.url + "/predict", script, 32, 1)
                result = run_wrk(server.url + "/predict", script, 32, args.seconds)
            (out / f"{slug}.txt").write_text(result.raw)
            rates[name].append(result.requests_per_s)
            print(f"{name}, round {round_ + 1}: {result.requests_per_s:,.0f} req/s", flush=True)
    mean = {name: sum(found) / len(found) for name, found in rates.items()}
    lines = [f"# SERVING_CPU_AFFINITY on the request path, {stamp} UTC", "",
             f"`python -m bench.affinity --before {args.before} --mode {args.mode} --rounds {args.rounds}"
             f" --seconds {args.seconds}`: gunicorn -w 2, onnx, digits-tf, wrk -c32 on POST /predict, the three"
             " servers alternating in every round.", "",
             "| server | req/s per round | mean | / before |", "| --- | --- | ---: | ---: |"]
    for name, found in rates.items():
        lines.append(f"| {name} | {', '.join(f'{r:,.0f}' for r in found)} | {mean[name]:,.0f} |"
                     f" {mean[name] / mean['before']:.2f} |")
    path = args.reports / f"affinity-{stamp}.md"
    path.write_text("\n".join(lines) + "\n")
    print(path.read_text())


if __name__ == "__main__":
    main()
