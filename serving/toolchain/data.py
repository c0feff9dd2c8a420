"""Datasets for training and tests: MNIST (28x28), scikit-learn's bundled digits (8x8) and iris.

The image loaders return a ``Dataset`` of float32 images in [0, 1] shaped (N, H, W) and int64
labels; iris is a feature dataset: rows of 4 float32 measurements, with the feature names and
label names scikit-learn gives them.

MNIST is read from the four standard IDX files (plain or gzipped) or a Keras-style ``mnist.npz``;
``locate_mnist`` finds them the way torchvision and Keras users expect (given directories, then a
per-user cache) and only then downloads them from the public mirrors, verifying each decompressed
file against its published sha256 before it lands in the cache.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

DATASETS = ("mnist", "digits", "iris")
MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
MNIST_NPZ = "mnist.npz"
# sha256 and size of each *decompressed* file: the mirrors' .gz wrappers differ, their contents must
# not.
MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
MNIST_SIZES = {
    "train-images-idx3-ubyte": 47_040_016,
    "train-labels-idx1-ubyte": 60_008,
    "t10k-images-idx3-ubyte": 7_840_016,
    "t10k-labels-idx1-ubyte": 10_008,
}
# torchvision's mirrors, in its order: the S3 copy first (yann.lecun.com often refuses or answers
# 403).
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
DOWNLOAD_TIMEOUT = 30.0  # seconds per socket operation, not per file
# IDX magic: two zero bytes, a type code (0x08 = unsigned byte), then the number of dimensions.
IDX_UBYTE = 0x08


class DatasetError(ValueError):
    """A dataset is missing or malformed; the message names the file and how to fix it."""


@dataclass
class Dataset:
    """Samples with int64 labels and the label names: images (N, H, W) float32 in [0, 1], or
    feature rows (N, F) float32 with their ``feature_names`` (``kind`` says which)."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    labels: list[str] = field(default_factory=lambda: [str(i) for i in range(10)])
    kind: str = "image"
    feature_names: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, ...]:
        """One sample's shape: (H, W) of an image, (F,) of a feature row."""
        return tuple(int(d) for d in self.x_train.shape[1:])

    def feature_ranges(self) -> list[tuple[float, float]]:
        """The smallest and largest value of each feature in the training split."""
        # float32 values written with the digits they have: 4.3, not 4.300000190734863
        return [
            (float(f"{low:.7g}"), float(f"{high:.7g}"))
            for low, high in zip(self.x_train.min(axis=0), self.x_train.max(axis=0), strict=True)
        ]

    @property
    def num_classes(self) -> int:
        """Number of label classes."""
        return len(self.labels)

    def head(self, train: int | None = None, test: int | None = None) -> Dataset:
        """The first ``train`` / ``test`` samples (None keeps a split whole): quick runs on a
        slice of MNIST."""
        return replace(
            self,
            x_train=self.x_train[:train],
            y_train=self.y_train[:train],
            x_test=self.x_test[:test],
            y_test=self.y_test[:test],
        )


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


def load_iris_dataset(seed: int = 0, test_size: float = 0.2) -> Dataset:
    """scikit-learn's bundled iris (150 flowers, 4 measurements in cm, 3 species) with a stratified,
    seeded held-out test split."""
    from sklearn.datasets import load_iris
    from sklearn.model_selection import train_test_split

    bunch = load_iris()
    features = bunch.data.astype(np.float32)
    labels = bunch.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        features, labels, test_size=test_size, random_state=seed, stratify=labels
    )
    return Dataset(
        "iris",
        x_train,
        y_train,
        x_test,
        y_test,
        labels=[str(name) for name in bunch.target_names],
        kind="features",
        feature_names=[str(name) for name in bunch.feature_names],
    )


def read_idx(path: Path) -> np.ndarray:
    """Parse an unsigned-byte IDX file (plain or ``.gz``) into a uint8 array of its declared
    shape."""
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
        raise DatasetError(
            f"{path} holds {len(raw) - header} bytes of data, its header {dims} promises {expected}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as an unsigned-byte IDX file, gzipped when the name ends in ``.gz``
    (``read_idx``'s inverse: what makes MNIST-format files out of other data)."""
    if array.dtype != np.uint8 or not 1 <= array.ndim <= 255:
        raise ValueError(
            f"IDX needs a uint8 array with 1-255 dimensions, got {array.dtype} {array.shape}"
        )
    header = bytes([0, 0, IDX_UBYTE, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + np.ascontiguousarray(array).tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


def _find_idx(data_dir: Path, stem: str) -> Path | None:
    for candidate in (data_dir / stem, data_dir / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def has_mnist(data_dir: Path) -> bool:
    """Whether ``data_dir`` holds all four IDX files (plain or .gz) or ``mnist.npz`` (what
    ``load_mnist`` reads)."""
    return (
        all(_find_idx(data_dir, stem) for stem in MNIST_FILES.values())
        or (data_dir / MNIST_NPZ).is_file()
    )


def _mnist_dataset(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, source: Path
) -> Dataset:
    for images, labels, split in ((x_train, y_train, "train"), (x_test, y_test, "test")):
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DatasetError(
                f"{source}: {split} images {images.shape} and labels {labels.shape} do not match "
                "(want (N, H, W), (N,))"
            )
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DatasetError(
            f"{source}: train images are {x_train.shape[1:]}, test images {x_test.shape[1:]}"
        )
    for labels in (y_train, y_test):
        if labels.size and (labels.min() < 0 or labels.max() > 9):
            raise DatasetError(
                f"{source}: labels must be digits 0-9, found {labels.min()}..{labels.max()}"
            )
    return Dataset(
        "mnist",
        x_train.astype(np.float32) / 255.0,
        y_train.astype(np.int64),
        x_test.astype(np.float32) / 255.0,
        y_test.astype(np.int64),
    )


def load_mnist(data_dir: Path | str) -> Dataset:
    """MNIST from ``data_dir``: the four IDX files (plain or .gz) or ``mnist.npz``; never
    downloads."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DatasetError(f"MNIST data directory {data_dir} does not exist")
    found = {key: _find_idx(data_dir, stem) for key, stem in MNIST_FILES.items()}
    if all(found.values()):
        arrays = {key: read_idx(path) for key, path in found.items() if path is not None}
        return _mnist_dataset(
            arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"], data_dir
        )
    npz_path = data_dir / MNIST_NPZ
    if npz_path.is_file():
        try:
            with np.load(npz_path, allow_pickle=False) as npz:
                arrays = {key: np.asarray(npz[key]) for key in MNIST_FILES}
        except KeyError as exc:
            raise DatasetError(
                f"{npz_path} lacks key {exc} (needs x_train, y_train, x_test, y_test)"
            ) from exc
        except (OSError, ValueError) as exc:
            raise DatasetError(f"cannot read {npz_path}: {exc}") from exc
        return _mnist_dataset(
            arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"], npz_path
        )
    missing = ", ".join(f"{MNIST_FILES[key]}[.gz]" for key, path in found.items() if path is None)
    raise DatasetError(f"MNIST not found in {data_dir}: missing {missing} (or {MNIST_NPZ})")


def mnist_cache_dir(environ: Mapping[str, str]) -> Path:
    """The per-user cache, ``$XDG_CACHE_HOME/serving/mnist`` else ``~/.cache/serving/mnist``
    (XDG's rule)."""
    base = environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if os.path.isabs(base) else Path.home() / ".cache"
    return root / "serving" / "mnist"


def mirrors_from(text: str | None) -> tuple[str, ...]:
    """Mirror base URLs from a comma- or space-separated string (``$MNIST_MIRRORS``); the
    defaults when empty."""
    mirrors = tuple(
        part if part.endswith("/") else part + "/"
        for part in (text or "").replace(",", " ").split()
    )
    return mirrors or MNIST_MIRRORS


def locate_mnist(
    candidates: Sequence[Path],
    cache: Path,
    mirrors: Sequence[str] | None,
    log: Callable[[str], None] = print,
) -> Path:
    """The first of ``candidates`` then ``cache`` that holds MNIST; else download it into ``cache``.

    ``mirrors=None`` forbids downloading (``--no-download``). Only files the cache lacks are
    fetched.
    """
    for directory in (*candidates, cache):
        if has_mnist(directory):
            return directory
        if directory != cache:
            log(f"MNIST is not in {directory}")
    if mirrors is None:
        wanted = ", ".join(f"{stem}[.gz]" for stem in MNIST_FILES.values())
        searched = ", ".join(str(d) for d in (*candidates, cache))
        raise DatasetError(
            f"MNIST not found in {searched} (each needs {wanted} or {MNIST_NPZ}) and --no-download "
            "forbids fetching it: pass --data-dir, set MNIST_DIR, or allow the download"
        )
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatasetError(
            f"cannot create the MNIST cache {cache}: {exc.strerror or exc}"
        ) from None
    for stem in MNIST_FILES.values():
        if _find_idx(cache, stem) is None:
            fetch_mnist_file(stem, cache, mirrors, log)
    return cache


def fetch_mnist_file(
    stem: str, directory: Path, mirrors: Sequence[str], log: Callable[[str], None] = print
) -> Path:
    """Download ``<stem>.gz`` from the first mirror that serves a good copy into
    ``directory/<stem>`` (decompressed).

    The decompressed bytes must match ``MNIST_SHA256``; only then are they written to a temporary
    file in ``directory`` and renamed into place, so a partial or corrupt download never lands
    there. Each failed mirror is logged in one line; when all fail, one ``DatasetError`` line names
    the file and why.
    """
    failures = []
    for mirror in mirrors:
        url = f"{mirror}{stem}.gz"
        log(f"downloading {url}")
        try:
            content = _gunzip(_download(url, MNIST_SIZES[stem] + (1 << 20)), MNIST_SIZES[stem])
            digest = hashlib.sha256(content).hexdigest()
            if digest != MNIST_SHA256[stem]:
                raise ValueError(
                    f"sha256 of the decompressed file is {digest}, expected {MNIST_SHA256[stem]}"
                )
        except (OSError, http.client.HTTPException, ValueError, zlib.error) as exc:
            reason = (
                f"HTTP {exc.code} {exc.reason}"
                if isinstance(exc, urllib.error.HTTPError)
                else str(exc)
            )
            failures.append(f"{url}: {reason}")
            log(f"{stem}.gz from {url} discarded: {reason}")
            continue
        try:
            return _write_atomically(directory / stem, content)
        except OSError as exc:
            raise DatasetError(f"cannot write {directory / stem}: {exc.strerror or exc}") from None
    raise DatasetError(f"could not download {stem}.gz from any mirror: {'; '.join(failures)}")


def _download(url: str, limit: int) -> bytes:
    """The body at ``url``, refusing more than ``limit`` bytes (a hostile or broken mirror cannot
    fill memory)."""
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response:
        declared = response.headers.get("Content-Length", "")
        # with a size, a connection closed early gives a short read, not an error
        body = response.read(limit + 1)
    if len(body) > limit:
        raise ValueError(f"the server sent more than {limit} bytes")
    if declared.isdigit() and len(body) < int(declared):
        raise ValueError(
            f"the connection closed after {len(body)} bytes, {int(declared) - len(body)} more were "
            "promised"
        )
    return bytes(body)


def _gunzip(data: bytes, size: int) -> bytes:
    """Decompress one gzip stream that must hold exactly ``size`` bytes, without ever inflating
    more."""
    inflater = zlib.decompressobj(wbits=31)  # 31: gzip header and trailer, CRC checked
    try:
        content = inflater.decompress(data, size + 1)
    except zlib.error as exc:
        raise ValueError(f"not a valid gzip file ({exc})") from None
    if len(content) > size:
        raise ValueError(f"decompresses to more than the expected {size} bytes")
    if not inflater.eof:
        raise ValueError(
            f"truncated: the gzip stream ends after {len(data)} bytes ({len(content)} of {size} "
            "decompressed)"
        )
    return content


def _write_atomically(path: Path, content: bytes) -> Path:
    """Write ``content`` to ``path`` via a temporary file in the same directory and a rename."""
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp made it private; the cache may be shared with a server's user
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def load_dataset(name: str, data_dir: Path | str | None = None, seed: int = 0) -> Dataset:
    """Dispatch on the dataset name: ``digits`` and ``iris`` (bundled) or ``mnist`` (needs
    ``data_dir``)."""
    if name == "digits":
        return load_digits_dataset(seed)
    if name == "iris":
        return load_iris_dataset(seed)
    if name == "mnist":
        if data_dir is None:
            raise DatasetError(
                "--dataset mnist needs --data-dir pointing at the MNIST IDX files or mnist.npz"
            )
        return load_mnist(data_dir)
    raise DatasetError(f"unknown dataset {name!r} (choose from {', '.join(DATASETS)})")
