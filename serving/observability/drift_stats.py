"""The statistics drift is measured with: what a sample is reduced to, how it is binned, and PSI.

Shared by the toolchain, which records the reference statistics of a model's inputs and predicted
classes at train and import time (``serving.toolchain.reference``, into ``metadata.json``), and by
the server, which bins its traffic the same way (``serving.observability.drift``). Pure numpy.

A sample is reduced to a few scalar *inputs*: for an image (both sides at least 8 pixels), the mean
intensity of the whole image and of each of the 4 x 4 bands of a grid over it (``band_R_C``:
row R, column C); for a feature vector, each feature (the first ``MAX_FEATURES``), named
``feature_I`` or as the model names them. Each input's reference distribution is binned at its
deciles (repeated cut points merged, so a band that is almost always blank has few bins), and the
drift score of an input is the population stability index of the window's bins against the
reference's: ``PSI = sum((q - p) * ln(q / p))`` with half a sample added to every bin of both, so
an empty bin is finite. The class prior's score is the PSI of the predicted classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

GRID = 4
MAX_FEATURES = 64
QUANTILES = np.linspace(0.1, 0.9, 9)
FORMAT = "serving.reference/1"
CLASS_PRIOR = "class_prior"


def is_image(shape: Sequence[int]) -> bool:
    return len(shape) == 2 and shape[0] >= 8 and shape[1] >= 8


def input_names(shape: Sequence[int], names: Sequence[str] | None = None) -> list[str]:
    """The inputs a sample of ``shape`` (H, W) is reduced to."""
    if is_image(shape):
        bands = [f"band_{row}_{col}" for row in range(GRID) for col in range(GRID)]
        return ["mean_intensity", *bands]
    size = int(np.prod(shape))
    count = min(size, MAX_FEATURES)
    if names is not None and len(names) >= count:
        return [str(name) for name in names[:count]]
    return [f"feature_{index}" for index in range(count)]


def reduce(batch: np.ndarray) -> np.ndarray:
    """A batch (N, H, W) of images or (N, F) of feature rows as its inputs (N, k), in
    ``input_names`` order."""
    batch = np.asarray(batch, dtype=np.float32)
    count = batch.shape[0]
    if not is_image(batch.shape[1:]):
        return batch.reshape(count, -1)[:, :MAX_FEATURES]
    height, width = batch.shape[1:]
    rows = np.linspace(0, height, GRID + 1).astype(int)
    cols = np.linspace(0, width, GRID + 1).astype(int)
    sums = np.add.reduceat(np.add.reduceat(batch, rows[:-1], axis=1), cols[:-1], axis=2)
    areas = np.outer(np.diff(rows), np.diff(cols)).astype(np.float32)
    bands = (sums / areas).reshape(count, GRID * GRID)
    return np.concatenate([batch.mean(axis=(1, 2))[:, None], bands], axis=1)


def cut_points(values: np.ndarray) -> np.ndarray:
    """The deciles of one input's reference values, repeated ones merged."""
    return np.unique(np.quantile(values, QUANTILES).astype(np.float64))


def bin_counts(values: np.ndarray, edges: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Per input j, how many of ``values[:, j]`` fall in each bin of ``edges[j]`` (bin i holds
    the values in ``(edges[i-1], edges[i]]``, the last bin everything above)."""
    return [
        np.bincount(np.searchsorted(cuts, values[:, j], side="left"), minlength=len(cuts) + 1)
        for j, cuts in enumerate(edges)
    ]


def class_counts(probabilities: np.ndarray, classes: int) -> np.ndarray:
    """How often each class was the most probable one."""
    return np.bincount(np.argmax(probabilities, axis=1), minlength=classes)[:classes]


def psi(reference: np.ndarray, window: np.ndarray) -> float:
    """Population stability index of ``window``'s counts against ``reference``'s."""
    p = (np.asarray(reference, dtype=np.float64) + 0.5) / (np.sum(reference) + 0.5 * len(reference))
    q = (np.asarray(window, dtype=np.float64) + 0.5) / (np.sum(window) + 0.5 * len(window))
    return float(np.sum((q - p) * np.log(q / p)))


def reference_statistics(
    inputs: np.ndarray,
    probabilities: np.ndarray,
    labels: Sequence[str],
    names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """What ``metadata.json`` records as ``reference``: each input's cut points and counts, the
    mean intensity, and the predicted classes' counts, from (N, H, W) inputs and the model's
    (N, classes) probabilities on them."""
    reduced = reduce(inputs)
    edges = [cut_points(reduced[:, j]) for j in range(reduced.shape[1])]
    counts = bin_counts(reduced, edges)
    return {
        "format": FORMAT,
        "samples": int(len(inputs)),
        "mean_intensity": round(float(np.mean(inputs)), 6),
        "inputs": {
            name: {"edges": [float(x) for x in cuts], "counts": [int(c) for c in hits]}
            for name, cuts, hits in zip(
                input_names(inputs.shape[1:], names), edges, counts, strict=True
            )
        },
        CLASS_PRIOR: {
            "labels": list(labels),
            "counts": [int(c) for c in class_counts(probabilities, len(labels))],
        },
    }
