"""Real servers for tests and benchmarks: one harness, used by tests/conftest.py and bench/.

``GunicornServer`` runs a real gunicorn master with its workers on a free loopback port, waits until
every worker has loaded its model (or, for apps without models, until anything answers), and always
stops the whole process group, so a failed test or benchmark leaves no process behind. It only ever
binds to 127.0.0.1.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

BASE_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}


#: Every port ``free_port`` has handed out in this process, never handed out again.
_HANDED_OUT: set[int] = set()
_HANDED_OUT_LOCK = threading.Lock()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, and that this process was never
    given before: the kernel may hand a port that was closed here out again at once, and a server's
    HTTP and gRPC binds (or nginx and its upstream) then got the same port."""
    with _HANDED_OUT_LOCK:
        while True:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port: int = sock.getsockname()[1]
            if port not in _HANDED_OUT:
                _HANDED_OUT.add(port)
                return port


def clean_env(**extra: str) -> dict[str, str]:
    """The current environment without any SERVING_* variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVING_")}
    env.update(BASE_ENV)
    env.update(extra)
    return env


def gunicorn_command() -> list[str]:
    """gunicorn from this interpreter's environment."""
    script = Path(sys.executable).with_name("gunicorn")
    return [str(script)] if script.exists() else [sys.executable, "-m", "gunicorn"]


class GunicornServer:
    """One real gunicorn master serving on 127.0.0.1:<free port>.

    ``settings`` become ``SERVING_*`` variables (``model="digits-tf"`` -> ``SERVING_MODEL``), added
    to ``env``.
    ``ready="models"`` waits for a model-loaded ``/health`` answer from every worker;
    ``ready="answer"`` waits for any answer below 500 from ``ready_path`` (apps without models, such
    as the no-op floor).
    """

    def __init__(
        self,
        repo: Path | None,
        log_dir: Path,
        args: Sequence[str] = (),
        *,
        cwd: Path | None = None,
        app: str = "flask_server:app",
        config: str = "gunicorn.conf.py",
        env: dict[str, str] | None = None,
        ready: Literal["models", "answer"] = "models",
        ready_path: str = "/health",
        log_file: Path | None = None,
        **settings: Any,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        #: The gRPC port: a free one of its own; gRPC is on in every test server unless a test sets
        #: grpc_bind (the default is off).
        self.grpc_port = free_port()
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"
        self.log_path = log_file or log_dir / f"gunicorn-{self.port}.log"
        variables = {"SERVING_WORKERS": "2", **(env or {})}
        variables.update({f"SERVING_{k.upper()}": str(v) for k, v in settings.items()})
        if repo is not None:
            variables.setdefault("SERVING_MODEL_REPOSITORY", str(repo))
        variables["SERVING_BIND"] = f"127.0.0.1:{self.port}"
        variables.setdefault("SERVING_GRPC_BIND", self.grpc_target)
        self.env = clean_env(**variables)
        self.cwd = cwd or Path.cwd()
        self.command = [
            *gunicorn_command(),
            "-c",
            config,
            "-b",
            f"127.0.0.1:{self.port}",
            *args,
            app,
        ]
        self.workers = _workers(args, self.env)
        self.ready, self.ready_path = ready, ready_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True, timeout: float = 60.0) -> GunicornServer:
        """Start gunicorn; with ``wait`` block until it is ready (see the class docstring)."""
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.command,
                cwd=self.cwd,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Poll until ready, or raise with the server's log (also when gunicorn exits)."""
        import requests

        deadline = time.monotonic() + timeout
        ready_pids: set[int] = set()
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"gunicorn exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.ready == "answer":
                    method = "POST" if self.ready_path.startswith("/predict") else "GET"
                    if (
                        requests.request(
                            method, self.url + self.ready_path, json={}, timeout=2
                        ).status_code
                        < 500
                    ):
                        time.sleep(1.0)  # the first worker answered; give the others their start-up
                        return
                else:
                    body = requests.get(self.url + "/health", timeout=2).json()
                    if body.get("model_loaded"):
                        ready_pids.add(body["worker"])
                        if len(ready_pids) >= self.workers:
                            return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise AssertionError(f"server not ready after {timeout}s:\n{self.log()}")

    def metrics(self, until: Callable[[str], bool] | None = None, timeout: float = 10.0) -> str:
        """``/metrics`` once ``until(text)`` holds (polled until ``timeout``), else after one flush
        period.

        Workers add their counts into the shared files once every FLUSH_SECONDS, so a scrape right
        after the requests may not include the other workers' last second yet.
        """
        import requests

        from serving.observability.metrics import FLUSH_SECONDS

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
        return None if self.proc is None else stop_group(self.proc, timeout)

    def __enter__(self) -> GunicornServer:
        try:
            return self.start()
        except BaseException:  # never ready: stop what started anyway, __exit__ will not run
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def metric_total(text: str, name: str) -> float:
    """The sum of metric ``name``'s samples over every label set, in a ``/metrics`` text."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith((name + "{", name + " "))
    )


def stop_group(proc: subprocess.Popen[Any], timeout: float = 30.0) -> int | None:
    """Stop a server started with ``start_new_session=True``: SIGTERM its leader and wait up to
    ``timeout``, then SIGKILL whatever is left of its process group (workers orphaned by a
    crashed master too)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)
    return proc.returncode


def _workers(args: Sequence[str], env: dict[str, str]) -> int:
    """How many workers the command starts: ``-w N`` / ``--workers N`` wins over SERVING_WORKERS."""
    for flag in ("-w", "--workers"):
        if flag in args and args.index(flag) + 1 < len(args):
            return int(args[args.index(flag) + 1])
    return int(env.get("SERVING_WORKERS", "1"))
