"""Drift scores on real MNIST: t10k against shifted digits, through a real 2-worker server.

Serves mnist-torch (trained by ``train.py --dataset mnist``, whose reference statistics are those of its
training inputs and of its predictions on t10k) with ``SERVING_DRIFT=true`` and a short window, sends the
first ``--samples`` t10k digits as they are, inverted, moved 6 pixels right, darkened to half their
intensity, and as they are again, one phase per window, and reads ``serving_drift_score`` from ``/metrics``
after each. Writes ``reports/drift-<date>.md``:

    python -m bench.drift                       # models/mnist-torch (make train-mnist)
    python -m bench.drift --limit-train 6000    # trains its own quick model into a temporary folder
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import requests

from bench.harness import ROOT, mnist_dir, save_report
from serving.toolchain.data import load_mnist
from serving.tools.testing import GunicornServer, clean_env

WINDOW_S = 6.0


def scores(url: str) -> dict[str, float]:
    text = requests.get(f"{url}/metrics", timeout=10).text
    pattern = r'serving_drift_score\{input="([^"]+)",model="mnist-torch",version="1"\} (\S+)'
    return {name: float(value) for name, value in re.findall(pattern, text)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=ROOT / "models", help="repository holding mnist-torch")
    parser.add_argument("--limit-train", type=int, default=0, help="train a quick mnist-torch on this many images")
    parser.add_argument("--samples", type=int, default=2000, help="t10k digits per phase")
    parser.add_argument("--threshold", type=float, default=0.25, help="SERVING_DRIFT_THRESHOLD")
    parser.add_argument("--reports", type=Path, default=ROOT / "reports", help="where the report goes")
    args = parser.parse_args()
    mnist = mnist_dir()
    repo = args.repo
    if args.limit_train:
        repo = Path(tempfile.mkdtemp(prefix="drift-models-"))
        subprocess.run([sys.executable, "train.py", "--out", str(repo), "--dataset", "mnist", "--framework",
                        "pytorch", "--limit-train", str(args.limit_train), "--epochs", "2", "--no-download"],
                       cwd=ROOT, env=clean_env(MNIST_DIR=str(mnist)), check=True, timeout=1200)
    if not (repo / "mnist-torch").is_dir():
        raise SystemExit(f"no mnist-torch in {repo}: make train-mnist, or pass --limit-train 6000")
    images = load_mnist(mnist).x_test[: args.samples]
    phases = [("t10k", images), ("inverted", 1.0 - images), ("moved 6 pixels right", np.roll(images, 6, axis=2)),
              ("half intensity", images * 0.5), ("t10k again", images)]
    rows = []
    out_dir = args.reports / "drift-logs"
    out_dir.mkdir(parents=True, exist_ok=True)
    with GunicornServer(repo, out_dir, cwd=ROOT, model="mnist-torch", backend="onnx", mode="threaded", workers=2,
                        drift="true", drift_window_s=str(WINDOW_S), drift_min_samples=str(args.samples // 2),
                        drift_threshold=str(args.threshold)) as server:
        for name, data in phases:
            print(f"{name} ...", flush=True)
            with requests.Session() as session:
                for start in range(0, len(data), 50):
                    answer = session.post(f"{server.url}/predict", json={"data": data[start:start + 50].tolist()},
                                          timeout=30)
                    answer.raise_for_status()
            time.sleep(2.5)  # a fold (once a second) in every worker
            found = scores(server.url)
            rows.append((name, found))
            top = max(found.items(), key=lambda item: item[1])
            print(f"  max {top[0]} {top[1]:.3f}, class_prior {found['class_prior']:.3f}", flush=True)
            time.sleep(WINDOW_S + 1.5)  # this phase leaves the window
    stamp = datetime.now(UTC).strftime("%Y-%m-%d-%H%M")
    lines = [
        f"# Drift scores on real MNIST ({stamp} UTC)", "",
        f"`python -m bench.drift{' --limit-train ' + str(args.limit_train) if args.limit_train else ''}"
        f"{' --repo ' + str(args.repo) if args.repo != ROOT / 'models' and not args.limit_train else ''}`:"
        f" mnist-torch through ONNX Runtime, 2 workers (threaded), SERVING_DRIFT_WINDOW_S={WINDOW_S:g};"
        f" each phase sends the first {args.samples} t10k digits (50 per request) and reads"
        " `serving_drift_score` (PSI) merged over both workers. The reference: the model's training inputs and"
        f" its predicted classes on t10k. Threshold {args.threshold:g}.", "",
        "| phase | highest input score | mean_intensity | class_prior | inputs over the threshold |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for name, found in rows:
        inputs = {key: value for key, value in found.items() if key != "class_prior"}
        top = max(inputs.items(), key=lambda item: item[1])
        over = sum(value > args.threshold for value in found.values())
        lines.append(f"| {name} | {top[1]:.3f} ({top[0]}) | {found['mean_intensity']:.3f} |"
                     f" {found['class_prior']:.3f} | {over} of {len(found)} |")
    report = "\n".join(lines) + "\n"
    path = args.reports / f"drift-{stamp}.md"
    save_report(path, report)


if __name__ == "__main__":
    main()
