"""Finding and downloading MNIST, for real, against a local HTTP server playing the mirrors (never the internet)."""

from __future__ import annotations

import gzip
import hashlib
import re
from pathlib import Path

import numpy as np
import pytest

from serving.toolchain.data import (
    MNIST_FILES,
    MNIST_MIRRORS,
    MNIST_SHA256,
    DatasetError,
    fetch_mnist_file,
    has_mnist,
    load_mnist,
    locate_mnist,
    mirrors_from,
    mnist_cache_dir,
    write_idx,
)
from tests.mnist_support import gz_bytes, mirror_server, mnist_dir, run_train, write_good_mirror

LABELS = "t10k-labels-idx1-ubyte"


def no_partial_files(directory: Path) -> bool:
    return not directory.exists() or not [p for p in directory.iterdir() if p.name.endswith(".part")]


def write_fake_mnist(directory: Path, label: int) -> Path:
    """Tiny MNIST-format files whose labels are all ``label``, so tests can tell directories apart."""
    directory.mkdir(parents=True)
    for key, stem in MNIST_FILES.items():
        array = np.zeros((3, 28, 28), np.uint8) if key.startswith("x") else np.full(3, label, np.uint8)
        write_idx(directory / stem, array)
    return directory


def test_full_download_into_an_empty_cache(tmp_path: Path) -> None:
    lines: list[str] = []
    with mirror_server(write_good_mirror(tmp_path / "www")) as (url, requests):
        found = locate_mnist([], tmp_path / "cache", [url + "/good/"], log=lines.append)
    assert found == tmp_path / "cache"
    for stem, digest in MNIST_SHA256.items():
        assert hashlib.sha256((found / stem).read_bytes()).hexdigest() == digest
    assert sorted(requests) == sorted(f"/good/{stem}.gz" for stem in MNIST_FILES.values())
    assert sum(line.startswith("downloading http://127.0.0.1") for line in lines) == 4
    assert no_partial_files(found)
    dataset = load_mnist(found)
    assert dataset.x_train.shape == (60000, 28, 28) and dataset.x_test.shape == (10000, 28, 28)
    assert dataset.y_train[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert dataset.y_test[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


def test_a_404_mirror_falls_back_to_the_next(tmp_path: Path) -> None:
    lines: list[str] = []
    with mirror_server(write_good_mirror(tmp_path / "www", (LABELS,))) as (url, requests):
        path = fetch_mnist_file(LABELS, tmp_path, [url + "/missing/", url + "/good/"], log=lines.append)
    assert requests == [f"/missing/{LABELS}.gz", f"/good/{LABELS}.gz"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == MNIST_SHA256[LABELS]
    assert [line for line in lines if "discarded" in line] == [
        f"{LABELS}.gz from {url}/missing/{LABELS}.gz discarded: HTTP 404 File not found"
    ]


def bad_copies(good: bytes) -> dict[str, bytes]:
    """A corrupted copy (valid gzip, one pixel changed), a truncated one, and bytes that are no gzip at all."""
    content = bytearray(gzip.decompress(good))
    content[5000] ^= 0xFF
    return {"corrupt": gzip.compress(bytes(content)), "truncated": good[: len(good) // 2], "garbage": b"<html>busy"}


@pytest.mark.parametrize(("kind", "reason"), [
    ("corrupt", "sha256 of the decompressed file is [0-9a-f]{64}, expected " + MNIST_SHA256[LABELS]),
    ("truncated", "truncated: the gzip stream ends after"),
    ("garbage", "not a valid gzip file"),
    ("dropped", r"the connection closed after \d+ bytes, \d+ more were promised"),  # hung up halfway
])
def test_a_bad_download_never_lands_and_is_named_in_one_line(tmp_path: Path, kind: str, reason: str) -> None:
    www = write_good_mirror(tmp_path / "www", (LABELS,))
    (www / kind).mkdir(exist_ok=True)
    if kind != "dropped":
        (www / kind / f"{LABELS}.gz").write_bytes(bad_copies((www / "good" / f"{LABELS}.gz").read_bytes())[kind])
    cache = tmp_path / "cache"
    cache.mkdir()
    lines: list[str] = []
    with mirror_server(www) as (url, _):
        with pytest.raises(DatasetError) as info:
            fetch_mnist_file(LABELS, cache, [f"{url}/{kind}/"], log=lines.append)
        message = str(info.value)
        assert "\n" not in message
        assert message.startswith(f"could not download {LABELS}.gz from any mirror: {url}/{kind}/{LABELS}.gz: ")
        assert re.search(reason, message), message
        assert list(cache.iterdir()) == []  # neither the file nor a temporary copy
        # the same bad mirror first, then a good one: the good copy lands
        path = fetch_mnist_file(LABELS, cache, [f"{url}/{kind}/", f"{url}/good/"], log=lines.append)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == MNIST_SHA256[LABELS]
    assert [p.name for p in cache.iterdir()] == [LABELS]
    assert sum("discarded" in line for line in lines) == 2


def test_a_gzip_bomb_is_cut_off(tmp_path: Path) -> None:
    (tmp_path / "bomb").mkdir()
    (tmp_path / "bomb" / f"{LABELS}.gz").write_bytes(gzip.compress(bytes(50_000_000)))
    with mirror_server(tmp_path) as (url, _), pytest.raises(DatasetError, match="more than the expected 10008 bytes"):
        fetch_mnist_file(LABELS, tmp_path, [url + "/bomb/"], log=lambda line: None)
    assert not (tmp_path / LABELS).exists()


def test_only_the_missing_files_are_fetched(tmp_path: Path) -> None:
    source, cache = mnist_dir(), tmp_path / "cache"
    cache.mkdir()
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        (cache / f"{stem}.gz").write_bytes(gz_bytes(source, stem))
    assert not has_mnist(cache)
    with mirror_server(write_good_mirror(tmp_path / "www", ("t10k-images-idx3-ubyte", LABELS))) as (url, requests):
        assert locate_mnist([], cache, [url + "/good/"], log=lambda line: None) == cache
    assert sorted(requests) == ["/good/t10k-images-idx3-ubyte.gz", f"/good/{LABELS}.gz"]
    assert load_mnist(cache).y_test[:3].tolist() == [7, 2, 1]


def test_search_order_data_dir_then_mnist_dir_then_cache(tmp_path: Path) -> None:
    first, second, cache = (write_fake_mnist(tmp_path / name, label) for name, label in
                            (("first", 1), ("second", 2), ("cache", 3)))
    empty = tmp_path / "empty"
    empty.mkdir()
    lines: list[str] = []
    # mirrors=None: nothing may be downloaded, so finding the files is the only way this can pass
    assert locate_mnist([first, second], cache, None, lines.append) == first
    assert locate_mnist([empty, second], cache, None, lines.append) == second
    assert locate_mnist([empty], cache, None, lines.append) == cache
    assert lines == [f"MNIST is not in {empty}"] * 2
    assert load_mnist(locate_mnist([empty, second], cache, None, lines.append)).y_test.tolist() == [2, 2, 2]


def test_no_download_names_every_place_searched(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as info:
        locate_mnist([tmp_path / "a"], tmp_path / "cache", None, log=lambda line: None)
    message = str(info.value)
    assert message.startswith(f"MNIST not found in {tmp_path / 'a'}, {tmp_path / 'cache'} (each needs ")
    assert "train-images-idx3-ubyte[.gz]" in message and "--no-download" in message
    assert not (tmp_path / "cache").exists()  # refusing to download creates nothing


def test_cache_dir_follows_xdg(tmp_path: Path) -> None:
    assert mnist_cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "serving" / "mnist"
    home_cache = Path.home() / ".cache" / "serving" / "mnist"
    assert mnist_cache_dir({}) == home_cache
    assert mnist_cache_dir({"XDG_CACHE_HOME": "relative/dir"}) == home_cache  # XDG: relative paths are ignored


def test_mirrors_from_text() -> None:
    assert mirrors_from(None) == mirrors_from("  ") == MNIST_MIRRORS
    assert MNIST_MIRRORS[0] == "https://ossci-datasets.s3.amazonaws.com/mnist/"
    assert mirrors_from("http://a/x, http://b/y/ http://c") == ("http://a/x/", "http://b/y/", "http://c/")


@pytest.mark.slow
def test_train_downloads_into_the_cache_then_reuses_it(tmp_path: Path) -> None:
    with mirror_server(write_good_mirror(tmp_path / "www")) as (url, requests):
        mirrors = f"{url}/missing/ {url}/good/"
        args = ("--dataset", "mnist", "--framework", "pytorch", "--epochs", "1", "--limit-train", "2000",
                "--limit-test", "500")
        first = run_train(tmp_path, *args, MNIST_MIRRORS=mirrors)
        assert first.returncode == 0, first.stdout + first.stderr
        assert len(requests) == 8  # four 404s from the first mirror, four files from the second
        second = run_train(tmp_path, *args, "--no-download", MNIST_MIRRORS=mirrors)
        assert second.returncode == 0, second.stdout + second.stderr
        assert len(requests) == 8  # found in the cache: nothing fetched again
    cache = tmp_path / "xdg" / "serving" / "mnist"
    assert f"MNIST from {cache}" in first.stdout and f"MNIST from {cache}" in second.stdout
    assert "HTTP 404" in first.stdout and "downloading" not in second.stdout
    assert "2000 train / 500 test samples" in second.stdout
    assert sorted(p.name for p in cache.iterdir()) == sorted(MNIST_FILES.values())


def test_train_no_download_is_one_error_line(tmp_path: Path) -> None:
    result = run_train(tmp_path, "--dataset", "mnist", "--no-download", MNIST_DIR=str(tmp_path / "nowhere"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: MNIST not found in {tmp_path / 'nowhere'}, ")
    assert "--no-download" in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "xdg").exists() and not (tmp_path / "models").exists()


def test_an_unwritable_cache_is_one_error_line(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the cache should go")
    with pytest.raises(DatasetError, match=f"^cannot create the MNIST cache {re.escape(str(blocker / 'mnist'))}: "):
        locate_mnist([], blocker / "mnist", ["http://127.0.0.1:9/"], log=lambda line: None)
    with mirror_server(write_good_mirror(tmp_path / "www", (LABELS,))) as (url, _):
        with pytest.raises(DatasetError, match=f"^cannot write {re.escape(str(blocker / LABELS))}: "):
            fetch_mnist_file(LABELS, blocker, [url + "/good/"], log=lambda line: None)
