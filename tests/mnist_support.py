"""Where tests find real MNIST, and a local HTTP server that plays an MNIST mirror.

Real MNIST is never copied into the repository and never downloaded by tests: ``MNIST_DIR`` (default
``../shared/data/mnist`` from the repository root) points at the four IDX files, and tests that need
them skip, saying why, where they are absent.
"""

from __future__ import annotations

import gzip
import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from serving.toolchain.data import MNIST_FILES, has_mnist, load_mnist
from tests.conftest import clean_env

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MNIST_DIR = ROOT.parent / "shared" / "data" / "mnist"
# Where train.py "downloads" from in tests unless a test serves files: a closed local port, so a test that
# wrongly needs a download fails fast instead of reaching the internet.
NO_MIRROR = "http://127.0.0.1:9/"


def mnist_dir() -> Path:
    """``$MNIST_DIR`` (default ``../shared/data/mnist``) if it holds MNIST, else skip the calling test."""
    directory = Path(os.environ.get("MNIST_DIR") or DEFAULT_MNIST_DIR)
    if not has_mnist(directory):
        pytest.skip(f"real MNIST not found in {directory}: set MNIST_DIR to a directory with the four IDX files")
    return directory


def gz_bytes(directory: Path, stem: str) -> bytes:
    """One MNIST file from ``directory`` as a .gz body, as the mirrors serve it (gzipped here if stored plain)."""
    if (directory / f"{stem}.gz").is_file():
        return (directory / f"{stem}.gz").read_bytes()
    return gzip.compress((directory / stem).read_bytes(), compresslevel=1)


def t10k_digits(count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``count`` t10k images (float32 in [0, 1]) and labels, from ``mnist_dir()``."""
    dataset = load_mnist(mnist_dir())
    return dataset.x_test[:count], dataset.y_test[:count]


class _MirrorHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files like any mirror; under ``/dropped/`` it promises the whole file and hangs up halfway."""

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        if not self.path.startswith("/dropped/"):
            super().do_GET()
            return
        body = Path(self.translate_path("/good/" + self.path.removeprefix("/dropped/"))).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.close_connection = True

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        self.server.requests.append(self.path)  # type: ignore[attr-defined]  # one entry per answered request

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the stdlib's signature
        pass  # quiet: pytest shows what the tests assert, not an access log


@contextmanager
def mirror_server(root: Path) -> Iterator[tuple[str, list[str]]]:
    """Serve ``root`` on 127.0.0.1 (a free port); yields the base URL and the list of requested paths."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_MirrorHandler, directory=str(root)))
    server.requests = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server.requests  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def write_good_mirror(root: Path, stems: tuple[str, ...] = tuple(MNIST_FILES.values())) -> Path:
    """``root/good/<stem>.gz`` for each stem, copied from the real MNIST; returns ``root``."""
    source = mnist_dir()
    (root / "good").mkdir(parents=True, exist_ok=True)
    for stem in stems:
        (root / "good" / f"{stem}.gz").write_bytes(gz_bytes(source, stem))
    return root


def run_train(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """train.py into ``tmp_path/models`` with a private cache (``tmp_path/xdg``), no ``MNIST_DIR`` and no
    reachable mirror unless ``env`` names them: nothing outside ``tmp_path`` is found, fetched or written."""
    environment = clean_env(**{"XDG_CACHE_HOME": str(tmp_path / "xdg"), "MNIST_MIRRORS": NO_MIRROR, **env})
    if "MNIST_DIR" not in env:
        environment.pop("MNIST_DIR", None)
    return subprocess.run([sys.executable, "train.py", "--out", str(tmp_path / "models"), *args], cwd=ROOT,
                          env=environment, capture_output=True, text=True, timeout=300, check=False)
