"""Datasets: bundled digits, and MNIST read from IDX files / mnist.npz written here by hand."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from serving.toolchain.data import (
    MNIST_FILES,
    DatasetError,
    load_dataset,
    load_digits_dataset,
    load_mnist,
    read_idx,
    write_idx,
)


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez with named arrays (numpy's stubs mistake ``**arrays`` for its bool keyword)."""
    np.savez(path, **arrays)  # type: ignore[arg-type]


def fake_mnist(n_train: int = 30, n_test: int = 12, side: int = 28) -> dict[str, np.ndarray]:
    """Random uint8 images with every value 0..255 represented, and digit labels."""
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (n_train, side, side), dtype=np.uint8),
        "y_train": (np.arange(n_train) % 10).astype(np.uint8),
        "x_test": rng.integers(0, 256, (n_test, side, side), dtype=np.uint8),
        "y_test": (np.arange(n_test) % 10).astype(np.uint8),
    }
    arrays["x_train"][0, 0, :2] = [0, 255]
    return arrays


def write_mnist_idx(directory: Path, arrays: dict[str, np.ndarray], gz: dict[str, bool]) -> None:
    for key, stem in MNIST_FILES.items():
        write_idx(directory / (stem + (".gz" if gz[key] else "")), arrays[key])


def check_mnist(dataset_arrays: dict[str, np.ndarray], directory: Path) -> None:
    dataset = load_mnist(directory)
    assert dataset.name == "mnist"
    assert dataset.shape == (28, 28)
    assert dataset.labels == [str(i) for i in range(10)]
    for key in MNIST_FILES:
        value = getattr(dataset, key)
        expected = dataset_arrays[key]
        assert value.shape == expected.shape
        if key.startswith("x"):
            assert value.dtype == np.float32
            np.testing.assert_allclose(value, expected.astype(np.float32) / 255.0)
        else:
            assert value.dtype == np.int64
            np.testing.assert_array_equal(value, expected)
    assert dataset.x_train.min() == 0.0 and dataset.x_train.max() == 1.0


def test_digits_shapes_ranges_and_stratified_split() -> None:
    dataset = load_digits_dataset(seed=0)
    assert (dataset.name, dataset.shape, dataset.num_classes) == ("digits", (8, 8), 10)
    assert dataset.labels == [str(i) for i in range(10)]
    assert dataset.x_train.shape == (1437, 8, 8) and dataset.x_test.shape == (360, 8, 8)
    assert dataset.y_train.shape == (1437,) and dataset.y_test.shape == (360,)
    assert dataset.x_train.dtype == np.float32 and dataset.y_train.dtype == np.int64
    assert dataset.x_train.min() == 0.0 and dataset.x_train.max() == 1.0
    counts = np.bincount(dataset.y_test, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: ~20% of each class


def test_digits_split_is_deterministic_per_seed() -> None:
    first, again, other = load_digits_dataset(0), load_digits_dataset(0), load_digits_dataset(1)
    np.testing.assert_array_equal(first.x_test, again.x_test)
    np.testing.assert_array_equal(first.y_train, again.y_train)
    assert not np.array_equal(first.x_test, other.x_test)


@pytest.mark.parametrize("gzipped", ["none", "all", "mixed"])
def test_mnist_from_idx_files(tmp_path: Path, gzipped: str) -> None:
    arrays = fake_mnist()
    gz = {key: gzipped == "all" or (gzipped == "mixed" and key.startswith("x")) for key in MNIST_FILES}
    write_mnist_idx(tmp_path, arrays, gz)
    check_mnist(arrays, tmp_path)


def test_mnist_from_npz(tmp_path: Path) -> None:
    arrays = fake_mnist()
    write_npz(tmp_path / "mnist.npz", arrays)
    check_mnist(arrays, tmp_path)
    assert load_dataset("mnist", tmp_path).x_test.shape == (12, 28, 28)


def test_mnist_npz_with_pickled_objects_is_refused(tmp_path: Path) -> None:
    arrays: dict[str, np.ndarray] = {**fake_mnist(), "x_train": np.array([{"evil": 1}], dtype=object)}
    write_npz(tmp_path / "mnist.npz", arrays)
    with pytest.raises(DatasetError, match="mnist.npz"):
        load_mnist(tmp_path)


def test_mnist_npz_missing_key(tmp_path: Path) -> None:
    arrays = fake_mnist()
    del arrays["y_test"]
    write_npz(tmp_path / "mnist.npz", arrays)
    with pytest.raises(DatasetError, match="y_test"):
        load_mnist(tmp_path)


def test_mnist_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as info:
        load_mnist(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message
    for stem in MNIST_FILES.values():
        assert f"{stem}[.gz]" in message
    assert "mnist.npz" in message

    arrays = fake_mnist()
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", arrays["x_train"])
    write_idx(tmp_path / "train-labels-idx1-ubyte", arrays["y_train"])
    with pytest.raises(DatasetError) as info:
        load_mnist(tmp_path)
    message = str(info.value)
    assert "t10k-images-idx3-ubyte[.gz]" in message and "t10k-labels-idx1-ubyte[.gz]" in message
    assert "train-images" not in message


def test_mnist_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        load_mnist(tmp_path / "nope")


def test_idx_bad_magic_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(b"\x00\x00\x0d\x03" + b"\x00" * 32)  # 0x0d = float32 IDX: not what MNIST uses
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.*bad magic"):
        read_idx(path)
    path.write_bytes(b"PK\x03\x04 not an idx file")
    with pytest.raises(DatasetError, match="bad magic"):
        read_idx(path)


def test_idx_truncated_and_corrupt_gzip(tmp_path: Path) -> None:
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x01" * 5)
    with pytest.raises(DatasetError, match="5 bytes of data"):
        read_idx(path)
    broken = tmp_path / "t10k-labels-idx1-ubyte.gz"
    broken.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(DatasetError, match="cannot read"):
        read_idx(broken)


def test_idx_big_endian_dims(tmp_path: Path) -> None:
    array = np.arange(2 * 3 * 300, dtype=np.uint32).astype(np.uint8).reshape(2, 3, 300)
    write_idx(tmp_path / "x.gz", array)
    np.testing.assert_array_equal(read_idx(tmp_path / "x.gz"), array)


def test_mnist_mismatched_counts_and_bad_labels(tmp_path: Path) -> None:
    arrays = fake_mnist()
    arrays["y_test"] = arrays["y_test"][:5]
    write_npz(tmp_path / "mnist.npz", arrays)
    with pytest.raises(DatasetError, match="do not match"):
        load_mnist(tmp_path)
    arrays = fake_mnist()
    arrays["y_train"][3] = 12
    write_npz(tmp_path / "mnist.npz", arrays)
    with pytest.raises(DatasetError, match="0-9"):
        load_mnist(tmp_path)


def test_load_dataset_dispatch() -> None:
    assert load_dataset("digits", None, seed=0).name == "digits"
    with pytest.raises(DatasetError, match="--data-dir"):
        load_dataset("mnist", None)
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset("cifar", None)


def test_head_keeps_the_first_samples_of_each_split() -> None:
    dataset = load_digits_dataset(seed=0)
    head = dataset.head(100, 7)
    assert (len(head.y_train), len(head.y_test), head.shape, head.name) == (100, 7, (8, 8), "digits")
    np.testing.assert_array_equal(head.x_train, dataset.x_train[:100])
    np.testing.assert_array_equal(head.y_test, dataset.y_test[:7])
    whole = dataset.head(None, None)
    assert len(whole.y_train) == len(dataset.y_train) and len(whole.y_test) == len(dataset.y_test)
