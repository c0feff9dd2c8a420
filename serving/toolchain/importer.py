"""``serving import PATH --name NAME``: a Keras, SavedModel, TorchScript or ONNX classifier into the
repository, whose input is an image or a feature vector (a scikit-learn model through skl2onnx).

Reads the model's own signature (ONNX graph inputs and outputs, skl2onnx's probabilities and class
list included; the SavedModel's ``serving_default`` signature; Keras ``model.inputs``; TorchScript
records none, so it needs ``--input-shape``), stages a version folder with the artifact,
``labels.json`` and a ``sample.json`` (a labelled ``--sample``, else a synthetic input with no
label), runs the model through the very backend the server will use on a synthetic batch (one score
per label, probabilities or logits), optionally exports and checks an ONNX copy, and publishes it
(``serving.toolchain.publish``: ``metadata.json`` with the sha256 of every file, then a rename):
a server never sees half of a version. Every refusal is one line (exit 2); a model that needs code
to load (Keras ``safe_mode=False``, a pickled PyTorch module) is refused, because models are code
and the server loads none it cannot load safely. The command line: ``serving.toolchain.import_cli``.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from serving.store.repository import (
    ONNX_ARTIFACT,
    next_version,
    parse_metadata,
    valid_name,
)
from serving.toolchain.export import INPUT_NAME, ONNX_TOLERANCE, export_tf_function, export_torch
from serving.toolchain.import_options import feature_names_from, labels_from, read_sample
from serving.toolchain.onnx_signature import onnx_signature
from serving.toolchain.publish import publish, stage, write_json
from serving.toolchain.reference import from_file
from serving.toolchain.signatures import ImportRefused, Signature, detect, signature

BACKENDS = {
    "keras": "tensorflow",
    "savedmodel": "savedmodel",
    "torchscript": "pytorch",
    "onnx": "onnx",
}
ARTIFACTS = {"keras": "model.keras", "torchscript": "model.pt", "onnx": ONNX_ARTIFACT}


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


def _input_shape(text: str | None) -> tuple[int, ...] | None:
    """``--input-shape H,W`` (an image) or ``N`` (a feature vector)."""
    if text is None:
        return None
    try:
        dims = tuple(int(part) for part in text.split(","))
    except ValueError:
        dims = ()
    if len(dims) not in (1, 2) or min(dims) < 1:
        raise ImportRefused(
            "--input-shape takes H,W (an image) or N (a feature vector), e.g. 28,28"
        )
    return dims


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
    if sig.layout == "flat":
        dims: tuple[int | None, ...] = (None, int(np.prod(sig.shape)))
    else:
        height, width = sig.shape
        dims = {
            "NHWC": (None, height, width, 1),
            "NCHW": (None, 1, height, width),
            "NHW": (None, height, width),
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
    shape: tuple[int, ...],
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
    input_shape = _input_shape(args.input_shape)
    kind = args.input
    if kind == "auto" and (args.feature_names or (input_shape and len(input_shape) == 1)):
        kind = "features"
    if fmt == "onnx":
        sig = onnx_signature(source, kind)
    else:
        sig = signature(fmt, source, input_shape, kind)
    if input_shape is not None and tuple(input_shape) != sig.shape:
        raise ImportRefused(
            f"--input-shape {','.join(map(str, input_shape))} disagrees with the model's own"
            f" {'x'.join(map(str, sig.shape))}"
        )
    labels = labels_from(args.labels, args.labels_file, sig)
    names = feature_names_from(args.feature_names, sig)
    bounds = _pair(args.input_range, float, "--input-range")
    if bounds is None and sig.kind == "image":
        bounds = (0.0, 255.0) if sig.dtype == "uint8" else (0.0, 1.0)
    if bounds is not None and not bounds[0] < bounds[1]:
        raise ImportRefused("--input-range needs LOW < HIGH")
    if args.sample_label is not None and args.sample is None:
        raise ImportRefused("--sample-label labels a --sample FILE: give the file too")
    root = Path(args.repository)
    version = args.version or next_version(root, args.name)
    target = root / args.name / str(version)
    if target.exists():
        raise ImportRefused(
            f"{target} exists: versions are never overwritten; import as --version {version + 1}"
        )
    staging = stage(root, args.name, prefix=f".import-{version}-")
    try:
        backend = _stage(fmt, source, staging)
        raw = _metadata(args, fmt, backend, source, sig, labels, names, bounds)
        raw["version"] = version
        sample, sample_label = (None, None)
        if args.sample is not None:
            sample, sample_label = read_sample(Path(args.sample), sig, raw)
            sample_label = _sample_label(args.sample_label, sample_label, labels)
        batch = _synthetic_batch(sig, bounds, sample)
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
        answered = labels[int(final.argmax(axis=1)[0])]
        raw["sample"] = {"source": "given" if sample is not None else "synthetic"}
        if sample_label is not None:
            raw["sample"]["answer"] = answered
        if getattr(args, "reference", None):  # drift: statistics of representative inputs
            raw["reference"] = _reference(args.reference, sig.shape, backend, raw, staging, labels)
        write_json(staging / "labels.json", labels)
        write_json(
            staging / "sample.json",
            {"data": batch[0].tolist(), "label": sample_label},
            indent=False,
        )
        raw["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        publish(staging, root, args.name, raw, version)
    except FileExistsError:
        raise ImportRefused(
            f"{target} appeared meanwhile: import as --version {version + 1}"
        ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _metadata(
    args: argparse.Namespace,
    fmt: str,
    backend: str,
    source: Path,
    sig: Signature,
    labels: list[str],
    names: list[str],
    bounds: tuple[float, float] | None,
) -> dict[str, Any]:
    """``metadata.json`` of the import, before the checks add the output's activation."""
    spec: dict[str, Any] = {
        "kind": sig.kind,
        "name": sig.input_name,
        "shape": list(sig.shape),
        "dtype": sig.dtype,
        "layout": sig.layout,
        "range": None if bounds is None else [bounds[0], bounds[1]],
    }
    if names:
        spec["features"] = [{"name": name, "range": None} for name in names]
    output: dict[str, Any] = {
        "name": sig.output_name,
        "shape": [sig.classes],
        "dtype": "float32",
        "activation": "softmax",
    }
    if sig.output_keys is not None:
        output["keys"] = sig.output_keys
    return {
        "name": args.name,
        "framework": {"torchscript": "pytorch", "onnx": "onnx"}.get(fmt, "tensorflow"),
        "backend": backend,
        "source": f"imported {fmt}",
        "imported_from": str(source.resolve()),
        "input": spec,
        "output": output,
        "labels": labels,
    }


def _sample_label(flag: str | None, in_file: Any, labels: list[str]) -> str | None:
    """The given sample's label: ``--sample-label``, else the file's own; one of the labels."""
    label = flag if flag is not None else (None if in_file is None else str(in_file))
    if label is None:
        raise ImportRefused(
            '--sample needs its label: --sample-label LABEL (or a JSON file with a "label")'
        )
    if label not in labels:
        raise ImportRefused(
            f"--sample-label {label!r} is not one of the labels ({', '.join(labels)[:120]})"
        )
    return label


def _synthetic_batch(
    sig: Signature, bounds: tuple[float, float] | None, sample: np.ndarray | None
) -> np.ndarray:
    """Eight inputs to check the model on: the given sample first, then random values in the
    input range (around the sample, or the standard normal, for an unbounded feature vector)."""
    rng = np.random.default_rng(0)
    if bounds is not None:
        batch = rng.uniform(bounds[0], bounds[1], (8, *sig.shape))
        if sig.dtype == "uint8":
            batch = np.rint(batch)
    else:
        centre = 0.0 if sample is None else sample.astype(np.float64)
        batch = centre + rng.standard_normal((8, *sig.shape))
    if sample is not None:
        batch[0] = sample
    return batch.astype(np.float32)
