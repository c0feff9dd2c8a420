"""Datasets for training and tests: bundled scikit-learn digits (8x8) and user-supplied MNIST (28x28).

Both loaders return a ``Dataset`` of float32 images in [0, 1] shaped (N, H, W) and int64 labels.
Nothing is ever downloaded: MNIST is read from files the user already has, either the four standard
IDX files (plain or gzipped) or a Keras-style ``mnist.npz``.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DATASETS = ("digits", "mnist")
MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
MNIST_NPZ = "mnist.npz"
# IDX magic: two zero bytes, a type code (0x08 = unsigned byte), then the number of dimensions.
IDX_UBYTE = 0x08


class DatasetError(ValueError):
    """A dataset is missing or malformed; the message names the file and how to fix it."""


@dataclass
class Dataset:
    """Images (N, H, W) float32 in [0, 1], int64 labels, and the label names."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    labels: list[str] = field(default_factory=lambda: [str(i) for i in range(10)])

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) of one sample."""
        return int(self.x_train.shape[1]), int(self.x_train.shape[2])

    @property
    def num_classes(self) -> int:
        """Number of label classes."""
        return len(self.labels)


def load_digits_dataset(seed: int = 0, test_size: float = 0.2) -> Dataset:
    """scikit-learn's bundled 8x8 digits with a stratified, seeded held-out test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)
    labels = bunch.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=test_size, random_state=seed, stratify=labels
    )
    return Dataset("digits", x_train, y_train, x_test, y_test)


def read_idx(path: Path) -> np.ndarray:
    """Parse an unsigned-byte IDX file (plain or ``.gz``) into a uint8 array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != IDX_UBYTE or raw[3] == 0:
        raise DatasetError(
            f"{path} is not an unsigned-byte IDX file (bad magic number {raw[:4].hex() or 'empty'})"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path} is truncated: header declares {ndim} dimensions")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DatasetError(f"{path} holds {len(raw) - header} bytes of data, its header {dims} promises {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as an unsigned-byte IDX file, gzipped when the name ends in ``.gz`` (``read_idx``'s
    inverse: what makes MNIST-format files out of other data)."""
    if array.dtype != np.uint8 or not 1 <= array.ndim <= 255:
        raise ValueError(f"IDX needs a uint8 array with 1-255 dimensions, got {array.dtype} {array.shape}")
    header = bytes([0, 0, IDX_UBYTE, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + np.ascontiguousarray(array).tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


def _find_idx(data_dir: Path, stem: str) -> Path | None:
    for candidate in (data_dir / stem, data_dir / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _mnist_dataset(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                   source: Path) -> Dataset:
    for images, labels, split in ((x_train, y_train, "train"), (x_test, y_test, "test")):
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DatasetError(
                f"{source}: {split} images {images.shape} and labels {labels.shape} do not match (want (N, H, W), (N,))"
            )
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DatasetError(f"{source}: train images are {x_train.shape[1:]}, test images {x_test.shape[1:]}")
    for labels in (y_train, y_test):
        if labels.size and (labels.min() < 0 or labels.max() > 9):
            raise DatasetError(f"{source}: labels must be digits 0-9, found {labels.min()}..{labels.max()}")
    return Dataset(
        "mnist",
        x_train.astype(np.float32) / 255.0,
        y_train.astype(np.int64),
        x_test.astype(np.float32) / 255.0,
        y_test.astype(np.int64),
    )


def load_mnist(data_dir: Path | str) -> Dataset:
    """MNIST from ``data_dir``: the four IDX files (plain or .gz) or ``mnist.npz``; never downloads."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DatasetError(f"MNIST data directory {data_dir} does not exist")
    found = {key: _find_idx(data_dir, stem) for key, stem in MNIST_FILES.items()}
    if all(found.values()):
        arrays = {key: read_idx(path) for key, path in found.items() if path is not None}
        return _mnist_dataset(arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"], data_dir)
    npz_path = data_dir / MNIST_NPZ
    if npz_path.is_file():
        try:
            with np.load(npz_path, allow_pickle=False) as npz:
                arrays = {key: np.asarray(npz[key]) for key in MNIST_FILES}
        except KeyError as exc:
            raise DatasetError(f"{npz_path} lacks key {exc} (needs x_train, y_train, x_test, y_test)") from exc
        except (OSError, ValueError) as exc:
            raise DatasetError(f"cannot read {npz_path}: {exc}") from exc
        return _mnist_dataset(arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"], npz_path)
    missing = ", ".join(f"{MNIST_FILES[key]}[.gz]" for key, path in found.items() if path is None)
    raise DatasetError(f"MNIST not found in {data_dir}: missing {missing} (or {MNIST_NPZ})")


def load_dataset(name: str, data_dir: Path | str | None = None, seed: int = 0) -> Dataset:
    """Dispatch on the dataset name: ``digits`` (bundled) or ``mnist`` (needs ``data_dir``)."""
    if name == "digits":
        return load_digits_dataset(seed)
    if name == "mnist":
        if data_dir is None:
            raise DatasetError("--dataset mnist needs --data-dir pointing at the MNIST IDX files or mnist.npz")
        return load_mnist(data_dir)
    raise DatasetError(f"unknown dataset {name!r} (choose from {', '.join(DATASETS)})")
