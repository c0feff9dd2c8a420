"""Shared fixtures: a model repository trained once per session, and real gunicorn servers.

Servers are real ``gunicorn -c gunicorn.conf.py flask_server:app`` processes on a free loopback
port; ``GunicornServer.stop`` always runs (context manager / fixture finalizer), so a failing test
leaves no process behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from serving.observability.metrics import FLUSH_SECONDS

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
GUNICORN = str(Path(sys.executable).with_name("gunicorn"))
BASE_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def clean_env(**extra: str) -> dict[str, str]:
    """The current environment without any SERVING_* variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVING_")}
    env.update(BASE_ENV)
    env.update(extra)
    return env


def train(out: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run the real ``train.py`` CLI into ``out``."""
    return subprocess.run(
        [PYTHON, "train.py", "--out", str(out), *args], cwd=ROOT, env=clean_env(), capture_output=True,
        text=True, timeout=timeout, check=False,
    )


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with digits-tf/1 and digits-torch/1, trained once for the whole session."""
    out = tmp_path_factory.mktemp("models")
    result = train(out)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


class GunicornServer:
    """One real gunicorn master with its workers, serving on 127.0.0.1:<free port>."""

    def __init__(self, repo: Path, log_dir: Path, args: tuple[str, ...] = (), **settings: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"gunicorn-{self.port}.log"
        env = {f"SERVING_{k.upper()}": str(v) for k, v in settings.items()}
        env.setdefault("SERVING_MODEL_REPOSITORY", str(repo))
        env.setdefault("SERVING_WORKERS", "2")
        env["SERVING_BIND"] = f"127.0.0.1:{self.port}"
        self.env = clean_env(**env)
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True, timeout: float = 60.0) -> GunicornServer:
        """Start gunicorn; with ``wait`` block until every worker reports its model loaded."""
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [GUNICORN, "-c", "gunicorn.conf.py", *self.args, "flask_server:app"], cwd=ROOT, env=self.env,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Poll /health until a model-loaded answer arrives from every worker (or time out)."""
        deadline = time.monotonic() + timeout
        workers = int(self.env.get("SERVING_WORKERS", "1"))
        ready_pids: set[int] = set()
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"gunicorn exited with {self.proc.returncode}:\n{self.log()}")
            try:
                body = requests.get(self.url + "/health", timeout=2).json()
                if body.get("model_loaded"):
                    ready_pids.add(body["pid"])
                    if len(ready_pids) >= workers:
                        return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise AssertionError(f"server not ready after {timeout}s:\n{self.log()}")

    def metrics(self, until: Callable[[str], bool] | None = None, timeout: float = 10.0) -> str:
        """``/metrics`` once ``until(text)`` holds (polled until ``timeout``), else after one flush period.

        Workers add their counts into the shared files once every FLUSH_SECONDS, so a scrape right
        after the requests may not include the other workers' last second yet.
        """
        if until is None:
            time.sleep(FLUSH_SECONDS * 1.5)
            return requests.get(self.url + "/metrics", timeout=5).text
        deadline = time.monotonic() + timeout
        while True:
            text = requests.get(self.url + "/metrics", timeout=5).text
            if until(text) or time.monotonic() > deadline:
                return text
            time.sleep(0.2)

    def log(self) -> str:
        """Everything the server wrote so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM the master, wait; SIGKILL the whole process group if it lingers."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        try:  # workers orphaned by a crashed master
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return self.proc.returncode

    def __enter__(self) -> GunicornServer:
        try:
            return self.start()
        except BaseException:  # never ready: stop what started anyway, __exit__ will not run
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture
def server_factory(model_repo: Path, tmp_path: Path) -> Iterator[Any]:
    """Build servers in a test; every one of them is stopped when the test ends."""
    started: list[GunicornServer] = []

    def make(repo: Path | None = None, args: tuple[str, ...] = (), **settings: Any) -> GunicornServer:
        server = GunicornServer(repo or model_repo, tmp_path, args, **settings)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def repo_copy(model_repo: Path, tmp_path: Path) -> Path:
    """A private copy of the trained repository that a test may modify."""
    target = tmp_path / "models"
    shutil.copytree(model_repo, target)
    return target
