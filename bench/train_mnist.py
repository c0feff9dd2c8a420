"""Train the default MNIST models once and report what they reach: t10k accuracy, seconds, epochs, arch.

    python -m bench.train_mnist [--repo models] [--framework tensorflow pytorch] [--data-dir DIR]

Runs ``python train.py --dataset mnist --framework F --out REPO`` (default epochs and recipe, MNIST found
as train.py finds it: ``--data-dir``, ``$MNIST_DIR``, the per-user cache, else a download) once per
framework, one after the other, timing each whole command. Then it re-reads each published version:
its metadata, and the accuracy of its ONNX export on the 10,000 t10k images in ONNX Runtime (what the
server's onnx backend runs). Writes ``reports/mnist-train-<date>.md``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.harness import ROOT
from serving.store.repository import ModelMetadata, ModelRepository
from serving.toolchain.data import load_mnist
from serving.toolchain.training import FRAMEWORKS, NAME_SUFFIX, TRAIN_THREADS

TARGET, STRETCH = 0.990, 0.992


def train_once(framework: str, repo: Path, data_dir: Path | None) -> tuple[float, str]:
    """Run train.py for one framework; returns the command's wall seconds and its output."""
    command = [sys.executable, "train.py", "--dataset", "mnist", "--framework", framework, "--out", str(repo)]
    if data_dir is not None:
        command += ["--data-dir", str(data_dir)]
    print("$ " + " ".join(["python", *command[1:]]), flush=True)
    started = time.monotonic()
    result = subprocess.run(command, cwd=ROOT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
                            capture_output=True, text=True, check=False)
    seconds = time.monotonic() - started
    print(result.stdout, end="", flush=True)
    if result.returncode != 0:
        raise SystemExit(f"train.py failed ({result.returncode}):\n{result.stderr}")
    return seconds, result.stdout


def onnx_accuracy(meta: ModelMetadata, images: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy of the version's ONNX export on (N, H, W) images, in its layout, one thread."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(meta.path / "model.onnx"), options, providers=["CPUExecutionProvider"])
    inputs = np.expand_dims(images, 3 if meta.raw["input"]["layout"] == "NHWC" else 1).astype(np.float32)
    predicted = np.concatenate([session.run([meta.output_name], {meta.input_name: inputs[i : i + 1000]})[0]
                                .argmax(axis=1) for i in range(0, len(inputs), 1000)])
    return float(np.mean(predicted == labels))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=ROOT / "models", help="model repository to publish into")
    parser.add_argument("--framework", nargs="+", choices=FRAMEWORKS, default=list(FRAMEWORKS))
    parser.add_argument("--data-dir", type=Path, default=None, help="passed to train.py")
    parser.add_argument("--out", type=Path, default=ROOT / "reports")
    args = parser.parse_args()

    runs = []
    for framework in args.framework:
        seconds, output = train_once(framework, args.repo, args.data_dir)
        source = re.search(r"^MNIST from (.+)$", output, re.MULTILINE)
        in_run = re.search(r"held-out accuracy [\d.]+ on \d+ samples, ONNX max abs diff \S+ \(([\d.]+)s\)", output)
        meta = ModelRepository(args.repo).resolve(f"mnist-{NAME_SUFFIX[framework]}")
        runs.append((framework, meta, seconds, float(in_run.group(1)) if in_run else float("nan"),
                     source.group(1) if source else "?"))
    dataset = load_mnist(ROOT / runs[0][4])  # train.py ran in ROOT: a relative path is relative to it
    stamp = time.strftime("%Y-%m-%d-%H%M", time.gmtime())
    lines = [
        f"# MNIST training, {stamp} UTC",
        "",
        "`python train.py --dataset mnist --framework F` with the default recipe, once per framework, one after "
        f"the other, on a 2-core machine ({TRAIN_THREADS} training thread per run; another engineer's test runs "
        f"shared the machine). MNIST from `{runs[0][4]}`. Accuracy on all {len(dataset.y_test):,} t10k images: "
        "as train.py measured it with the saved native model, and again from the ONNX export in ONNX Runtime. "
        "*train* is train.py's own timer (training, saving, ONNX export and check); *command* is the whole process "
        "(imports and reading the data included). Produced by `bench/train_mnist.py`.",
        "",
        "| model | framework | arch | epochs | batch | schedule | t10k accuracy | errors | ONNX t10k accuracy "
        "| ONNX max abs diff | train s | command s |",
        "| --- | --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    verdicts = []
    for framework, meta, seconds, in_run, _ in runs:
        raw = meta.raw
        accuracy = float(raw["test_accuracy"])
        exported = onnx_accuracy(meta, dataset.x_test, dataset.y_test)
        errors = round((1 - accuracy) * raw["test_samples"])
        lines.append(
            f"| {meta.name} v{meta.version} | {framework} | {raw['arch']} | {raw['epochs']} | {raw['batch_size']} | "
            f"{raw.get('schedule', 'constant')} | **{accuracy:.4f}** | {errors} | {exported:.4f} | "
            f"{raw['onnx_max_abs_diff']:.1e} | {in_run:.0f} | {seconds:.0f} |"
        )
        met = "met" if accuracy >= TARGET else "NOT met"
        stretch = "met" if accuracy >= STRETCH else "not met"
        verdicts.append(f"- **{meta.name}: {accuracy:.4f} on t10k in {seconds:.0f} s; target {TARGET} {met}, "
                        f"stretch {STRETCH} {stretch}.**")
    lines += ["", "## Verdicts", "", *verdicts]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"mnist-train-{stamp}.md"
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
