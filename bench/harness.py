"""Shared benchmark plumbing: start a gunicorn server, drive it with wrk, parse what wrk says.

Load only ever targets 127.0.0.1 and every run is bounded by wrk's ``-d`` duration.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
GUNICORN = str(Path(sys.executable).with_name("gunicorn"))


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class WrkResult:
    """What one wrk run measured."""

    requests_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int  # non-2xx answers plus socket errors
    raw: str


class Server:
    """A gunicorn process group on a free loopback port, stopped by ``stop`` (or the with-block)."""

    def __init__(self, app: str, config: str, env: dict[str, str], args: list[str], log_path: Path,
                 ready_path: str = "/health") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [GUNICORN, "-c", config, "-b", f"127.0.0.1:{self.port}", *args, app]
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("SERVING_")}, **env}
        self.env["SERVING_BIND"] = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        self.ready_path = ready_path
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Server:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: see {self.log_path}")
            try:
                answer = requests.request("GET" if self.ready_path != "/predict" else "POST",
                                          self.url + self.ready_path, json={}, timeout=2)
                if answer.status_code < 500:
                    time.sleep(2)  # let every worker finish loading, not just the first to answer
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not ready in 120 s: see {self.log_path}")

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def wrk_script(path: Path, body: bytes, content_type: str = "application/json") -> Path:
    """A wrk Lua script that POSTs ``body`` (a long string with a level, so ']]' inside is safe)."""
    text = body.decode()
    assert "]==]" not in text
    path.write_text(
        'wrk.method = "POST"\n'
        f'wrk.headers["Content-Type"] = "{content_type}"\n'
        f"wrk.body = [==[{text}]==]\n"
    )
    return path


def run_wrk(url: str, script: Path, connections: int, seconds: int, threads: int = 2) -> WrkResult:
    """Drive ``url`` with wrk for ``seconds``; raises if wrk is not installed."""
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install -y wrk")
    output = subprocess.run(
        ["wrk", f"-t{min(threads, connections)}", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script),
         url], capture_output=True, text=True, timeout=seconds + 60, check=True,
    ).stdout
    return parse_wrk(output)


def _ms(value: str) -> float:
    number, unit = re.match(r"([\d.]+)(us|ms|s|m)", value).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def parse_wrk(output: str) -> WrkResult:
    """Pull requests/s, p50, p99 and error counts out of ``wrk --latency`` output."""
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", output).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", output).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    errors = int(non_2xx.group(1)) if non_2xx else 0
    if socket_errors:
        errors += sum(int(n) for n in socket_errors.groups())
    return WrkResult(rps, p50, p99, total, errors, output)
