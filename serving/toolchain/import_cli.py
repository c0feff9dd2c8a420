"""``serving import``'s command line: its options, the one line it prints, and its exit codes.

The import itself is ``serving.toolchain.importer.import_model``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import orjson

from serving.toolchain.importer import import_model
from serving.toolchain.signatures import KINDS, ImportRefused


def main(argv: list[str] | None = None) -> int:
    """``serving import``: exit 0 when imported, 2 on a usage error or a refusal (one line)."""
    from serving.config import Settings

    parser = argparse.ArgumentParser(
        prog="serving import",
        description="a Keras, SavedModel, TorchScript or ONNX classifier (of images or feature"
        " vectors, scikit-learn through skl2onnx included) into the model repository",
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
        "--labels",
        default=None,
        help="comma-separated labels, one per class (default: the model's own classes, else"
        " 0..N-1)",
    )
    parser.add_argument(
        "--labels-file",
        default=None,
        help="one label per line, a JSON list, or a JSON object class -> label"
        ' (e.g. {"0": "setosa", ...})',
    )
    parser.add_argument(
        "--input",
        choices=KINDS,
        default="auto",
        help="what the input is: an image, or a feature vector; auto: a flat input of N values"
        " is a feature vector unless N is a square of side 8 or more, or the model is skl2onnx's",
    )
    parser.add_argument(
        "--feature-names", default=None, help="comma-separated names of the features, in order"
    )
    parser.add_argument(
        "--input-range",
        default=None,
        help="LOW,HIGH the input values must lie in (images default 0,1, uint8 0,255; feature"
        " vectors default: none, only finite values)",
    )
    parser.add_argument(
        "--input-shape",
        default=None,
        help="H,W of one image, or N of a feature vector (required for TorchScript)",
    )
    parser.add_argument(
        "--sample",
        default=None,
        help="a real input for the smoke test GET /predict/test/label: JSON (a sample, or"
        ' {"data": ..., "label": ...}), .npy, .csv (one row) or, for an image model, a picture',
    )
    parser.add_argument("--sample-label", default=None, help="the label of --sample")
    parser.add_argument(
        "--reference",
        default=None,
        help="a .npy array of representative inputs (N samples of the input's shape, in its range):"
        " their statistics are recorded for drift scores",
    )
    parser.add_argument(
        "--export-onnx", action="store_true", help="also write and check an ONNX export"
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
    print(summary(target, orjson.loads((target / "metadata.json").read_bytes())))
    return 0


def summary(target: Path, meta: dict[str, Any]) -> str:
    """The line ``serving import`` prints: what was imported and what the server will take."""
    spec = meta["input"]
    bounds = spec.get("range")
    scale = "any finite values" if bounds is None else f"range {bounds[0]:g}-{bounds[1]:g}"
    if spec.get("kind") == "features":
        names = [feature["name"] for feature in spec.get("features", [])]
        what = f"{spec['shape'][0]} features" + (f" ({', '.join(names)})" if names else "")
        taken = f"{what} {spec['dtype']} ({scale})"
    else:
        taken = (
            f"{spec['shape'][0]}x{spec['shape'][1]} image {spec['dtype']} ({spec['layout']},"
            f" {scale})"
        )
    sample = meta.get("sample", {})
    if sample.get("source") == "given":
        label = orjson.loads((target / "sample.json").read_bytes())["label"]
        check = f"sample labelled {label} (the model answers {sample.get('answer')})"
    else:
        check = "no labelled sample (--sample FILE --sample-label L records one)"
    return (
        f"imported {meta['name']} version {meta['version']} into {target}/: {meta['backend']}"
        f" backend, input {taken}, {len(meta['labels'])} labels"
        f" ({', '.join(meta['labels'][:5])}{', ...' if len(meta['labels']) > 5 else ''}),"
        f" output {meta['output']['name']} {meta['output']['activation']}"
        + (", ONNX export checked" if "onnx_max_abs_diff" in meta else "")
        + f"; {check}"
    )
