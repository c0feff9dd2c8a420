"""What a user tells ``serving import`` about a model: its labels, feature names and a labelled
sample.

Labels come from ``--labels a,b,c``, or ``--labels-file`` (one per line, a JSON list, or a JSON
object from class to name such as the web-single-pattern tutorial's ``{"0": "setosa", ...}``), else
from the model's own class list (skl2onnx records it), else ``0``..``N-1``. The smoke-test sample is
``--sample FILE`` (JSON: a sample, or ``{"data": ..., "label": ...}``; ``.npy``; ``.csv``: one row;
for an image model also a picture, framed as uploads are) with ``--sample-label``; without one, a
synthetic input is stored with no label, and ``/predict/test/label`` says the label is unknown.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from serving.toolchain.signatures import ImportRefused, Signature

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff")
MAX_SAMPLE_BYTES = 64 * 1024 * 1024


def labels_from(text: str | None, path: str | None, sig: Signature) -> list[str]:
    """One label per score, in column order (see the module docstring for where they come
    from)."""
    if text and path:
        raise ImportRefused("give --labels or --labels-file, not both")
    classes = sig.classes
    if path:
        labels = _labels_file(Path(path), sig)
    elif text:
        labels = [label.strip() for label in text.split(",")]
    elif sig.class_labels is not None:
        labels = [str(label) for label in sig.class_labels]
    else:
        labels = [str(i) for i in range(classes)]
    if classes < 2 or len(labels) != classes:
        raise ImportRefused(
            f"the model returns {classes} scores per sample but there are {len(labels)} labels:"
            " give one label per class"
        )
    if len(set(labels)) != len(labels) or not all(labels):
        raise ImportRefused("labels must be distinct and non-empty")
    return labels


def _labels_file(path: Path, sig: Signature) -> list[str]:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ImportRefused(f"cannot read --labels-file {path}: {reason}") from None
    if path.suffix.lower() != ".json":
        return [line.strip() for line in text.splitlines() if line.strip()]
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ImportRefused(f"--labels-file {path} is not JSON ({exc})") from None
    if isinstance(value, list):
        return [str(label) for label in value]
    if not isinstance(value, dict):
        raise ImportRefused(f"--labels-file {path}: want a JSON list or an object class -> label")
    # {"0": "setosa", ...}: keyed by the model's classes when it names them, else by column
    keys = [str(c) for c in sig.class_labels] if sig.class_labels else None
    keys = keys or [str(i) for i in range(sig.classes)]
    missing = [key for key in keys if key not in value]
    if missing or len(value) != len(keys):
        raise ImportRefused(
            f"--labels-file {path} maps {', '.join(sorted(value))[:80]}; the model's classes are"
            f" {', '.join(keys)[:80]}: give one label for each"
        )
    return [str(value[key]) for key in keys]


def feature_names_from(text: str | None, sig: Signature) -> list[str]:
    """``--feature-names a,b,c``: one name per value of a feature vector (empty when not given)."""
    if not text:
        return []
    names = [name.strip() for name in text.split(",")]
    if sig.kind != "features":
        raise ImportRefused("--feature-names is for models whose input is a feature vector")
    if len(names) != sig.shape[0] or not all(names) or len(set(names)) != len(names):
        raise ImportRefused(
            f"--feature-names gives {len(names)} names; the model takes {sig.shape[0]} features:"
            " give one distinct name for each, in order"
        )
    return names


def read_sample(path: Path, sig: Signature, metadata: dict[str, Any]) -> tuple[np.ndarray, Any]:
    """One sample from ``path``, shaped and checked for the model; and the label the file gives
    (None when it gives none)."""
    try:
        if path.stat().st_size > MAX_SAMPLE_BYTES:
            raise ImportRefused(f"--sample {path} is over {MAX_SAMPLE_BYTES >> 20} MiB")
        raw = path.read_bytes()
    except OSError as exc:
        raise ImportRefused(f"cannot read --sample {path}: {exc.strerror}") from None
    suffix = path.suffix.lower()
    label = None
    if suffix in IMAGE_SUFFIXES:
        values = _framed_picture(raw, sig, metadata, path)
    elif suffix == ".npy":
        try:
            values = np.load(io.BytesIO(raw), allow_pickle=False)
        except ValueError as exc:
            raise ImportRefused(f"--sample {path} is not a plain .npy array ({exc})") from None
    elif suffix == ".csv":
        rows = [row for row in csv.reader(io.StringIO(raw.decode(errors="replace"))) if row]
        values = _numbers(rows[-1] if rows else [], path)
    else:
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ImportRefused(
                f"--sample {path} is not JSON, .npy, .csv or a picture ({exc})"
            ) from None
        if isinstance(value, dict):
            label = value.get("label")
            value = value.get("data")
        values = _numbers(value, path)
    size = int(np.prod(sig.shape))
    array = np.asarray(values, dtype=np.float64)
    if array.size != size or array.ndim > len(sig.shape) + 1:
        raise ImportRefused(
            f"--sample {path} holds {list(array.shape)} values; the model takes one sample of"
            f" {' x '.join(str(d) for d in sig.shape)}"
        )
    sample = array.reshape(sig.shape).astype(np.float32)
    bounds = metadata["input"]["range"]
    if not np.isfinite(sample).all() or (
        bounds is not None and not (sample.min() >= bounds[0] and sample.max() <= bounds[1])
    ):
        where = "" if bounds is None else f" in [{bounds[0]:g}, {bounds[1]:g}]"
        raise ImportRefused(f"--sample {path}: every value must be finite{where}")
    return sample, label


def _numbers(value: Any, path: Path) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ImportRefused(f"--sample {path} must hold numbers only") from None
    return array


def _framed_picture(raw: bytes, sig: Signature, metadata: dict[str, Any], path: Path) -> Any:
    """A picture framed as the server frames uploads, in the model's input range."""
    from serving.errors import ServingError
    from serving.protocol.inputs import batch_from_image
    from serving.store.repository import parse_metadata

    if sig.kind != "image":
        raise ImportRefused(f"--sample {path} is a picture; the model takes a feature vector")
    try:
        return batch_from_image(raw, parse_metadata(metadata, path.parent), 4_000_000)[0]
    except ServingError as exc:
        raise ImportRefused(f"--sample {path}: {exc}") from None
