"""Reference statistics for drift, recorded into ``metadata.json`` (``reference``) at train and
import time.

Training records the statistics of the training inputs (up to ``MAX_SAMPLES`` of them, evenly
spread) and of the classes the model predicts on the held-out test set; ``serving import
--reference FILE.npy`` records those of the representative inputs in the file and of the imported
model's predictions on them. The server bins its traffic the same way and scores it against these
(``serving.observability.drift``). What is recorded is described in
``serving.observability.drift_stats``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from serving.observability.drift_stats import reference_statistics

MAX_SAMPLES = 10_000
CHUNK = 256


def spread(inputs: np.ndarray, limit: int = MAX_SAMPLES) -> np.ndarray:
    """At most ``limit`` samples, evenly spaced over ``inputs`` (deterministic)."""
    if len(inputs) <= limit:
        return inputs
    return inputs[np.linspace(0, len(inputs) - 1, limit).astype(int)]


def from_training(
    train_inputs: np.ndarray,
    test_probabilities: np.ndarray,
    labels: Sequence[str],
    feature_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The reference of a trained model: its training inputs (images, or rows of features named
    ``feature_names``), its predictions on the test set."""
    return reference_statistics(
        spread(np.asarray(train_inputs)), test_probabilities, labels, feature_names
    )


def from_file(
    path: str | Path,
    shape: Sequence[int],
    predict: Callable[[np.ndarray], np.ndarray],
    labels: Sequence[str],
) -> dict[str, Any]:
    """The reference of an imported model: representative inputs from a ``.npy`` file (N samples
    of the input's shape, H x W or F values, or N flat rows, in the model's input range) and the
    model's predictions."""
    try:
        inputs = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--reference {path}: not a numpy .npy array ({exc})") from None
    shape = tuple(int(d) for d in shape)
    size = int(np.prod(shape))
    if inputs.ndim < 2 or inputs.shape[1:] not in (shape, (size,)):
        wanted = ", ".join(str(d) for d in shape)
        flat = f" or [N, {size}]" if len(shape) > 1 else ""
        raise ValueError(
            f"--reference {path}: shape {list(inputs.shape)}; expected [N, {wanted}]{flat}"
        )
    if len(inputs) < 100:
        raise ValueError(f"--reference {path}: {len(inputs)} samples; at least 100 are needed")
    inputs = spread(inputs.reshape(len(inputs), *shape).astype(np.float32))
    outputs = np.concatenate(
        [predict(inputs[start : start + CHUNK]) for start in range(0, len(inputs), CHUNK)]
    )
    return reference_statistics(inputs, outputs, labels)
