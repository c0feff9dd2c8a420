"""``serving import PATH --name NAME``: a Keras, SavedModel, TorchScript or ONNX classifier into the
repository.

Reads the model's own signature (ONNX graph inputs, the SavedModel's ``serving_default`` signature,
Keras ``model.inputs``; TorchScript records none, so it needs ``--input-shape``), stages a version
folder with the artifact, ``labels.json`` and a ``sample.json``, runs the model through the very
backend the server will use on a synthetic batch (one score per label, probabilities or logits),
optionally exports and checks an ONNX copy, writes ``metadata.json`` with the sha256 of every file,
and renames the folder into place: a server never sees half of a version. Every refusal is one line
(exit 2); a model that needs code to load (Keras ``safe_mode=False``, a pickled PyTorch module) is
refused, because models are code and the server loads none it cannot load safely.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from serving.store.repository import (
    ONNX_ARTIFACT,
    next_version,
    parse_metadata,
    sha256_file,
    valid_name,
)
from serving.toolchain.export import INPUT_NAME, ONNX_TOLERANCE, export_tf_function, export_torch
from serving.toolchain.reference import from_file
from serving.toolchain.signatures import ImportRefused, Signature, detect, signature
from serving.toolchain.training import write_json

BACKENDS = {
    "keras": "tensorflow",
    "savedmodel": "savedmodel",
    "torchscript": "pytorch",
    "onnx": "onnx",
}
ARTIFACTS = {"keras": "model.keras", "torchscript": "model.pt", "onnx": ONNX_ARTIFACT}


def _labels(args: argparse.Namespace, classes: int) -> list[str]:
    if args.labels and args.labels_file:
        raise ImportRefused("give --labels or --labels-file, not both")
    if args.labels_file:
        try:
            labels = [
                line.strip()
                for line in Path(args.labels_file).read_text().splitlines()
                if line.strip()
            ]
        except OSError as exc:
            raise ImportRefused(
                f"cannot read --labels-file {args.labels_file}: {exc.strerror}"
            ) from None
    elif args.labels:
        labels = [label.strip() for label in args.labels.split(",")]
    else:
        labels = [str(i) for i in range(classes)]
    if classes < 2 or len(labels) != classes:
        raise ImportRefused(
            f"the model returns {classes} scores per sample but there are {len(labels)} labels:"
            " give one label per class"
        )
    return labels


def _pair(text: str | None, kind: type, what: str) -> tuple[Any, Any] | None:
    if text is None:
        return None
    try:
        first, second = (kind(part) for part in text.split(","))
    except ValueError:
        example = "28,28" if kind is int else "0,1"
        raise ImportRefused(
            f"{what} takes two numbers separated by a comma, e.g. {example}"
        ) from None
    return first, second


def _stage(fmt: str, source: Path, staging: Path) -> str:
    """Copy the artifact into the staging folder; returns the backend that serves it."""
    if fmt == "savedmodel":
        shutil.copytree(source, staging, dirs_exist_ok=True)  # the version folder is the SavedModel
    else:
        shutil.copyfile(source, staging / ARTIFACTS[fmt])
    return BACKENDS[fmt]


def _run(backend: str, raw: dict[str, Any], staging: Path, batch: np.ndarray) -> np.ndarray:
    """The model's outputs on ``batch`` through the backend the server will use."""
    from serving.backends import backend_class
    from serving.errors import ModelLoadError

    runner = backend_class(backend)(parse_metadata(raw, staging), 1)
    try:
        runner.load()
        return np.asarray(runner.predict(batch), dtype=np.float32)
    except ModelLoadError as exc:
        raise ImportRefused(str(exc)) from None
    except Exception as exc:
        raise ImportRefused(
            f"the model failed on a synthetic {list(batch.shape)} batch ({exc.__class__.__name__}:"
            f" {str(exc)[:200]})"
        ) from None


def _export_onnx(fmt: str, staging: Path, raw: dict[str, Any], sig: Signature) -> None:
    """Write model.onnx next to the native artifact (tf2onnx or torch.onnx)."""
    height, width = sig.shape
    dims = {
        "NHWC": (None, height, width, 1),
        "NCHW": (None, 1, height, width),
        "NHW": (None, height, width),
        "flat": (None, height * width),
    }[sig.layout]
    if fmt == "onnx":
        raise ImportRefused("--export-onnx: the model is ONNX already")
    if fmt == "torchscript":
        import torch

        module = torch.jit.load(str(staging / ARTIFACTS[fmt]), map_location="cpu").eval()
        example = torch.zeros(tuple(1 if d is None else d for d in dims))
        export_torch(module, example, staging / ONNX_ARTIFACT)
        return
    import tensorflow as tf

    dtype = tf.uint8 if sig.dtype == "uint8" else tf.float32
    spec = (tf.TensorSpec(dims, dtype, name=INPUT_NAME),)
    if fmt == "keras":
        import keras

        model = keras.saving.load_model(
            str(staging / ARTIFACTS[fmt]), compile=False, safe_mode=True
        )
        function = tf.function(
            lambda x: model(x, training=False), input_signature=spec, autograph=False
        )
    else:
        loaded = tf.saved_model.load(str(staging))
        serve = loaded.signatures["serving_default"]
        function = tf.function(
            lambda x: serve(**{sig.input_name: x})[sig.output_name],
            input_signature=spec,
            autograph=False,
        )
    export_tf_function(function, spec, staging / ONNX_ARTIFACT)


def _reference(
    path: str,
    shape: tuple[int, int],
    backend: str,
    raw: dict[str, Any],
    staging: Path,
    labels: list[str],
) -> dict[str, Any]:
    """The reference statistics of ``--reference``'s inputs and of the model's predictions."""
    try:
        return from_file(path, shape, lambda batch: _run(backend, raw, staging, batch), labels)
    except ValueError as exc:
        raise ImportRefused(str(exc)) from None


def import_model(args: argparse.Namespace) -> Path:
    """Import ``args.path`` as the next (or the given) version of ``args.name``; returns the
    version folder."""
    source = Path(args.path)
    if not valid_name(args.name):
        raise ImportRefused(
            f"invalid model name {args.name!r}: letters, digits, '.', '_' and '-' (at most 64)"
        )
    fmt = detect(source)
    input_shape = _pair(args.input_shape, int, "--input-shape")
    sig = signature(fmt, source, input_shape)
    if input_shape is not None and tuple(input_shape) != sig.shape:
        raise ImportRefused(
            f"--input-shape {input_shape[0]},{input_shape[1]} disagrees with the model's own"
            f" {sig.shape[0]}x{sig.shape[1]}"
        )
    labels = _labels(args, sig.classes)
    default_range = (0.0, 255.0) if sig.dtype == "uint8" else (0.0, 1.0)
    low, high = _pair(args.input_range, float, "--input-range") or default_range
    if not low < high:
        raise ImportRefused("--input-range needs LOW < HIGH")
    root = Path(args.repository)
    version = args.version or next_version(root, args.name)
    target = root / args.name / str(version)
    if target.exists():
        raise ImportRefused(
            f"{target} exists: versions are never overwritten; import as --version {version + 1}"
        )
    (root / args.name).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".import-{version}-", dir=root / args.name))
    try:
        backend = _stage(fmt, source, staging)
        raw: dict[str, Any] = {
            "name": args.name,
            "version": version,
            "framework": "pytorch"
            if fmt == "torchscript"
            else ("onnx" if fmt == "onnx" else "tensorflow"),
            "backend": backend,
            "source": f"imported {fmt}",
            "imported_from": str(source.resolve()),
            "input": {
                "name": sig.input_name,
                "shape": list(sig.shape),
                "dtype": sig.dtype,
                "layout": sig.layout,
                "range": [low, high],
            },
            "output": {
                "name": sig.output_name,
                "shape": [sig.classes],
                "dtype": "float32",
                "activation": "softmax",
            },
            "labels": labels,
        }
        rng = np.random.default_rng(0)
        batch = rng.uniform(low, high, (8, *sig.shape)).astype(np.float32)
        if sig.dtype == "uint8":
            batch = np.rint(batch)
        output = _run(backend, raw, staging, batch)
        if output.shape != (len(batch), sig.classes):
            raise ImportRefused(
                f"the model returned shape {list(output.shape)} for {len(batch)} samples; expected"
                f" [{len(batch)}, {sig.classes}]"
            )
        sums = output.sum(axis=1)
        probabilities = output.min() >= 0 and np.allclose(sums, 1.0, atol=1e-3)
        raw["output"]["activation"] = "softmax" if probabilities else "logits"
        if args.export_onnx:
            _export_onnx(fmt, staging, raw, sig)
            exported = _run("onnx", raw, staging, batch)
            native = _run(backend, raw, staging, batch)
            diff = float(np.max(np.abs(exported - native)))
            if not diff < ONNX_TOLERANCE:
                raise ImportRefused(
                    f"the ONNX export disagrees with the model: max abs diff {diff:.3g}"
                )
            raw["onnx_max_abs_diff"] = diff
        final = _run(backend, raw, staging, batch[:1])
        if getattr(args, "reference", None):  # drift: statistics of representative inputs
            raw["reference"] = _reference(args.reference, sig.shape, backend, raw, staging, labels)
        write_json(staging / "labels.json", labels)
        write_json(
            staging / "sample.json",
            {"data": batch[0].tolist(), "label": labels[int(final.argmax(axis=1)[0])]},
            indent=False,
        )
        raw["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        raw["artifacts"] = {
            path.relative_to(staging).as_posix(): {"sha256": sha256_file(path)}
            for path in sorted(staging.rglob("*"))
            if path.is_file() and path.name != "metadata.json"
        }
        write_json(staging / "metadata.json", raw)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def main(argv: list[str] | None = None) -> int:
    """``serving import``: exit 0 when imported, 2 on a usage error or a refusal (one line)."""
    from serving.config import Settings

    parser = argparse.ArgumentParser(
        prog="serving import", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument(
        "path", help="a .keras file, a SavedModel folder, a TorchScript .pt or an .onnx file"
    )
    parser.add_argument("--name", required=True, help="the model's name in the repository")
    parser.add_argument(
        "--version", type=int, default=None, help="the version to write (default: the next)"
    )
    parser.add_argument(
        "--repository", default=None, help="repository root (default: SERVING_MODEL_REPOSITORY)"
    )
    parser.add_argument(
        "--labels", default=None, help="comma-separated labels, one per class (default 0..N-1)"
    )
    parser.add_argument("--labels-file", default=None, help="a file with one label per line")
    parser.add_argument(
        "--input-range",
        default=None,
        help="LOW,HIGH of the input values (default 0,1; uint8 0,255)",
    )
    parser.add_argument(
        "--input-shape", default=None, help="H,W of one image (required for TorchScript)"
    )
    parser.add_argument(
        "--export-onnx", action="store_true", help="also write and check an ONNX export"
    )
    parser.add_argument(
        "--reference",
        default=None,
        help="a .npy array of representative inputs (N x H x W, in the input range): their"
        " statistics are recorded for drift scores",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        if args.repository is None:
            args.repository = str(Settings.from_env().model_repository)
        if args.version is not None and args.version < 1:
            raise ImportRefused("--version must be >= 1")
        target = import_model(args)
    except ImportRefused as exc:
        # one line, whatever a framework said
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    meta = orjson.loads((target / "metadata.json").read_bytes())
    spec = meta["input"]
    print(
        f"imported {meta['name']} version {meta['version']} into {target}/: {meta['backend']} "
        "backend,"
        f" input {spec['shape'][0]}x{spec['shape'][1]} {spec['dtype']} ({spec['layout']}, range"
        f" {spec['range'][0]:g}-{spec['range'][1]:g}), {len(meta['labels'])} labels, output"
        f" {meta['output']['activation']}"
        + (", ONNX export checked" if "onnx_max_abs_diff" in meta else "")
    )
    return 0
