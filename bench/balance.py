"""Keep-alive connections over the workers: ``SERVING_BALANCE_CONNECTIONS`` off against on, alternating.

    python -m bench.balance [--rounds 6] [--seconds 6] [--configs large-batched-32,large-batched-64,small-threaded-32]

Every worker accepts from one listening socket, and a keep-alive connection stays with the worker that accepted it.
wrk opens its connections at once, so how they split between the ``-w 2`` workers is chance, and stays for the run.
For each configuration and round, the server runs with the setting off and then on (the order alternates between
rounds). After 2 s of wrk, ``ss`` counts each worker's established connections; the report gives the split, the
requests/s of the whole run, and batched mode's mean batch over the run (``serving_batch_size`` on /metrics).

- ``large-batched``: ``digits-large-torch`` in batched mode (PyTorch), where one worker holding most connections
  serves them on one core;
- ``small-threaded``: ``digits-torch``'s ONNX export in threaded mode, a light model: the request path's own cost.

Writes ``reports/balance-<stamp>.md``.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.batching import ensure_large_models
from bench.harness import ROOT, digits_script, model_server, run_wrk, save_report
from bench.pool_cpu import batches

CONFIGS = {  # name: (model, backend, mode, connections)
    "large-batched-32": ("digits-large-torch", "pytorch", "batched", 32),
    "large-batched-64": ("digits-large-torch", "pytorch", "batched", 64),
    "small-threaded-32": ("digits-torch", "onnx", "threaded", 32),
}


def split(port: str) -> list[int]:
    """Established connections on ``port`` per process, fewest first."""
    listing = subprocess.run(["ss", "-tnpH", "state", "established", f"( sport = :{port} )"],
                             capture_output=True, text=True, check=True).stdout
    counts: dict[str, int] = {}
    for pid in re.findall(r"pid=(\d+)", listing):
        counts[pid] = counts.get(pid, 0) + 1
    return sorted(counts.values())


def run(repo: Path, out_dir: Path, script: Path, name: str, balance: str, seconds: int, slug: str) -> dict[str, Any]:
    model, backend, mode, level = CONFIGS[name]
    with model_server("wsgi", repo, out_dir, slug, ["--no-control-socket"], model=model, backend=backend,
                      workers=2, mode=mode, balance_connections=balance) as server:
        run_wrk(server.url + "/predict", script, level, 2)  # warm; its connections close before the run
        result: dict[str, Any] = {}
        driver = threading.Thread(target=lambda: result.update(wrk=run_wrk(server.url + "/predict", script, level,
                                                                           seconds)))
        before = batches(server.url)
        driver.start()
        time.sleep(2)
        result["split"] = split(server.url.rsplit(":", 1)[1])
        driver.join()
        after = batches(server.url)
        count = after[1] - before[1]
        result["batch"] = (after[0] - before[0]) / count if count else float("nan")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated of: {', '.join(CONFIGS)}")
    parser.add_argument("--repo", type=Path, default=ROOT / "models")
    parser.add_argument("--reports", type=Path, default=ROOT / "reports")
    args = parser.parse_args()
    names = args.configs.split(",")
    stamp = datetime.now(UTC).strftime("%Y-%m-%d-%H%M")
    out_dir = args.reports / f"balance-{stamp}"
    out_dir.mkdir(parents=True, exist_ok=True)
    ensure_large_models(args.repo, ["pytorch"])
    script = digits_script(out_dir)
    rows: list[tuple[int, str, str, dict[str, Any]]] = []
    for round_number in range(1, args.rounds + 1):
        for name in names:
            order = ("false", "true") if round_number % 2 else ("true", "false")
            for balance in order:
                found = run(args.repo, out_dir, script, name, balance, args.seconds,
                            f"{name}-{balance}-r{round_number}")
                rows.append((round_number, name, balance, found))
                print(f"r{round_number} {name} balance={balance}: {found['wrk'].requests_per_s:,.0f} req/s,"
                      f" connections per worker {found['split']}, mean batch {found['batch']:.1f},"
                      f" errors {found['wrk'].errors}", flush=True)
    path = args.reports / f"balance-{stamp}.md"
    save_report(path, render(args, rows, stamp))


def render(args: argparse.Namespace, rows: list[tuple[int, str, str, dict[str, Any]]], stamp: str) -> str:
    lines = [f"# Keep-alive connections over the workers: SERVING_BALANCE_CONNECTIONS off and on, {stamp} UTC", "",
             f"`python -m bench.balance --rounds {args.rounds} --seconds {args.seconds} --configs {args.configs}`:"
             " `-w 2`, wrk on POST /predict with one 8x8 sample, the two settings alternating (the order flips every"
             " round). The split is each worker's established connections 2 s into the run (`ss`).", "",
             "| round | configuration | balance | connections per worker | requests/s | mean batch | errors |",
             "| ---: | --- | --- | --- | ---: | ---: | ---: |"]
    for round_number, name, balance, found in rows:
        batch = "-" if found["batch"] != found["batch"] else f"{found['batch']:.1f}"
        lines.append(f"| {round_number} | {name} | {balance} | {' / '.join(map(str, found['split']))} |"
                     f" {found['wrk'].requests_per_s:,.0f} | {batch} | {found['wrk'].errors} |")
    lines += ["", "## Over the rounds", "",
              "| configuration | balance | mean requests/s | min | max | on / off | most uneven split |",
              "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for name in args.configs.split(","):
        rates = {}
        for balance in ("false", "true"):
            found = [f for _, n, b, f in rows if (n, b) == (name, balance)]
            rates[balance] = [f["wrk"].requests_per_s for f in found]
            worst = min((f["split"] for f in found), key=lambda s: (s[0] / max(1, sum(s))) if s else 1.0)
            gain = statistics.mean(rates["true"]) / statistics.mean(rates["false"]) if balance == "true" else 0.0
            ratio = f"{gain:.3f}" if gain else ""
            lines.append(f"| {name} | {balance} | {statistics.mean(rates[balance]):,.0f} | {min(rates[balance]):,.0f} |"
                         f" {max(rates[balance]):,.0f} | {ratio} | {' / '.join(map(str, worst))} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
