"""Shared benchmark plumbing: start the model server on either front, drive it with wrk (HTTP) or h2load (gRPC),
parse what they say.

Servers come from ``serving.tools.testing`` (always stopped); load only ever targets 127.0.0.1 and every
run is bounded by wrk's ``-d`` duration.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from serving.protocol.v2.proto import grpc_service_pb2 as pb
from serving.toolchain.data import load_digits_dataset, load_mnist
from serving.tools.testing import GunicornServer

ROOT = Path(__file__).resolve().parent.parent
# SERVING_FRONT -> the app gunicorn serves; gunicorn.conf.py picks the worker class for the front.
FRONT_APPS = {"wsgi": "flask_server:app", "asgi": "asgi_server:app"}


def save_report(path: Path, text: str) -> None:
    """Write a benchmark's report to ``path``, print it and where it went."""
    path.write_text(text)
    print(text)
    print(f"report: {path}")


def parse_fronts(text: str) -> list[str]:
    """``--fronts wsgi,asgi`` as a list, or exit saying what is allowed."""
    fronts = [front.strip().lower() for front in text.split(",") if front.strip()]
    if not fronts or any(front not in FRONT_APPS for front in fronts):
        raise SystemExit(f"--fronts {text!r}: a comma-separated list of {', '.join(FRONT_APPS)}")
    return fronts


def model_server(front: str, repo: Path, log_dir: Path, slug: str, args: Sequence[str] = ("--no-control-socket",),
                 **settings: Any) -> GunicornServer:
    """The model server as shipped (gunicorn.conf.py) on ``front``, logging to ``log_dir/<slug>.log``.

    ``settings`` become SERVING_* variables. On ``asgi`` the same settings give the same model, mode and
    workers: gunicorn.conf.py picks the ASGI worker and the mode's request threads become the app's pool.
    """
    settings.setdefault("grpc_bind", "off")  # as shipped (the test harness turns gRPC on)
    return GunicornServer(repo, log_dir, args, cwd=ROOT, app=FRONT_APPS[front], log_file=log_dir / f"{slug}.log",
                          front=front, **settings)


@dataclass
class WrkResult:
    """What one wrk run measured."""

    requests_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int  # non-2xx answers plus socket errors
    raw: str


def wrk_script(path: Path, body: bytes, content_type: str = "application/json",
               headers: dict[str, str] | None = None) -> Path:
    """A wrk Lua script that POSTs ``body`` (a long string with a level, so ']]' inside is safe)."""
    text = body.decode()
    assert "]==]" not in text
    extra = "".join(f'wrk.headers["{name}"] = "{value}"\n' for name, value in (headers or {}).items())
    path.write_text(
        'wrk.method = "POST"\n'
        f'wrk.headers["Content-Type"] = "{content_type}"\n'
        f"{extra}wrk.body = [==[{text}]==]\n"
    )
    return path


def mnist_dir() -> Path:
    """Real MNIST: ``MNIST_DIR``, else the shared copy next to the repository."""
    return Path(os.environ.get("MNIST_DIR") or ROOT.parent / "shared" / "data" / "mnist")


def mnist_script(out_dir: Path, headers: dict[str, str] | None = None) -> Path:
    """``out_dir/mnist.lua``: wrk POSTs the first real t10k digit to ``/predict`` as 784 8-bit pixels
    (``pixel_range`` [0, 255])."""
    digit = np.rint(load_mnist(mnist_dir()).x_test[0] * 255)
    body = orjson.dumps({"data": digit.astype(int).reshape(-1).tolist(), "pixel_range": [0, 255]})
    return wrk_script(out_dir / "mnist.lua", body, headers=headers)


def digits_script(out_dir: Path) -> Path:
    """``out_dir/predict.lua``: wrk POSTs the first held-out 8x8 digits sample to ``/predict`` as JSON."""
    sample = load_digits_dataset(seed=0).x_test[0]
    return wrk_script(out_dir / "predict.lua", orjson.dumps({"data": sample.reshape(-1).tolist()}))


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


def grpc_body(x: np.ndarray, model: str, name: str) -> bytes:
    """One gRPC request on the wire, as h2load sends it: the 5-byte length prefix, then ModelInferRequest."""
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name=name, datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(np.ascontiguousarray(x, dtype="<f4").tobytes())
    message = request.SerializeToString()
    return b"\0" + struct.pack(">I", len(message)) + message


def run_h2load(url: str, body: Path, headers: dict[str, str], connections: int, seconds: int,
               out: Path) -> tuple[float, float, float, int]:
    """h2load (nghttp2) over HTTP/2 for ``seconds``, one request in flight per connection: req/s, p50 and p99 ms
    (from its per-request log), and the requests it did not see succeed. (Its HTTP/1.1 mode hangs at the end
    against gunicorn's sync workers, which close every connection: wrk measures HTTP.)"""
    if shutil.which("h2load") is None:
        raise SystemExit("h2load is not installed: apt-get install -y nghttp2-client (make bench-grpc does)")
    log = out.with_suffix(".log")
    command = ["h2load", "-D", str(seconds), "--warm-up-time", "1", "-c", str(connections), "-m", "1",
               "-d", str(body), f"--log-file={log}"]
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    result = subprocess.run([*command, url], capture_output=True, text=True, timeout=seconds + 120, check=False)
    out.write_text(" ".join(command) + f" {url}\n\n" + result.stdout + result.stderr)
    rate = float(re.search(r"finished in [\d.]+s, ([\d.]+) req/s", result.stdout).group(1))  # type: ignore[union-attr]
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", result.stdout)
    failed = int(done.group(1)) - int(done.group(2)) if done else -1
    latencies = np.asarray([int(line.split("\t")[2]) for line in log.read_text().splitlines() if line], dtype=float)
    return rate, float(np.percentile(latencies, 50)) / 1000, float(np.percentile(latencies, 99)) / 1000, failed
