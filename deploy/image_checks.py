"""Run the built images and check them for real; deploy/test-image.sh calls this after building them.

    python3 deploy/image_checks.py --image full=serving:full:baked --image onnx=serving:onnx:mounted \
        --models models --report reports/image-<date>.md

For each image: a container on 127.0.0.1 only (``--network host``, ``SERVING_BIND=127.0.0.1:<port>``),
then the checks below, each recorded as a row of the report; exit 1 when any fails. Standard library
only, so it runs with the system's python3 as well as the project's venv.

- the server runs as a non-root user, and that user cannot write /models;
- ``/health/ready`` turns 200, and Docker's own HEALTHCHECK reports the container healthy;
- a prediction of the model's stored sample is right (``/predict/label``), and v2 metadata answers for
  every model served (the full image loads digits-tf with TensorFlow and digits-torch with TorchScript in
  each worker; the ONNX image digits-torch's ONNX export);
- the frameworks import as intended (all three in the full image, only ONNX Runtime in the ONNX one);
- every log line is a JSON object;
- no compiler, pip or test tool in the image (and no TensorFlow or PyTorch in the ONNX image);
- ``docker stop`` (its default 10 s timeout) while a request is in flight: the request still gets a
  right answer, new connections are refused while it drains, the container exits 0 before the timeout;
- the gRPC port (``SERVING_GRPC_BIND``) answers grpc.health.v1's Check with SERVING, asked from inside the
  container with the image's own grpcio;
- the ASGI front (``SERVING_FRONT=asgi``) in batched mode answers a prediction right: both fronts are in both images;
- with nothing at /models the image refuses to start, with one log line saying so.

A check that cannot run (the server never became ready, a refused connection) is a FAIL row, and the other
checks and images still run: the report always lists every check.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

DOCKER = os.environ.get("DOCKER", "docker")
TOOLS = ("gcc", "cc", "c++", "make", "pip", "pip3", "pytest")


@dataclass
class Image:
    """One image under test: its role (full, onnx), tag and how its models arrive (baked or mounted)."""

    role: str
    tag: str
    models: str
    rows: list[tuple[str, bool, str]] = field(default_factory=list)

    def record(self, check: str, ok: bool, detail: str) -> bool:
        self.rows.append((check, ok, detail))
        print(f"[{self.role}] {'PASS' if ok else 'FAIL'} {check}: {detail}", flush=True)
        return ok


def docker(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout, check=check)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def request(port: int, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers={"Host": "localhost", **(headers or {})})
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()


def wait_until(predicate, timeout: float, step: float = 0.25) -> float | None:  # type: ignore[no-untyped-def]
    """Seconds until ``predicate()`` held, or None after ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if predicate():
                return time.monotonic() - start
        except OSError:
            pass
        time.sleep(step)
    return None


#: The gRPC port each container was given (the image's default, 0.0.0.0:8001, is not for a host network).
GRPC_PORTS: dict[str, int] = {}
#: A gRPC health check run with the image's own Python and grpcio: prints the status's name.
GRPC_HEALTH = ("import grpc, sys\nfrom grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g\n"
               "with grpc.insecure_channel(sys.argv[1]) as c:\n"
               "    print(h.HealthCheckResponse.ServingStatus.Name(g.HealthStub(c).Check(h.HealthCheckRequest(),"
               " timeout=10).status))")


def run_container(image: Image, name: str, port: int, models_dir: Path, *env: str) -> None:
    GRPC_PORTS[name] = free_port()
    args = ["run", "-d", "--name", name, "--network", "host", "-e", f"SERVING_BIND=127.0.0.1:{port}",
            "-e", f"SERVING_GRPC_BIND=127.0.0.1:{GRPC_PORTS[name]}", "-e", "SERVING_WORKERS=2"]
    for item in env:
        args += ["-e", item]
    if image.models == "mounted":
        args += ["-v", f"{models_dir.resolve()}:/models:ro"]
    docker(*args, image.tag)


#: What each image serves in its check: the full image its two frameworks at once (digits-tf with TensorFlow,
#: digits-torch with TorchScript, both loaded in every worker), the ONNX image digits-torch's ONNX export.
SERVED = {"full": ("digits-tf", "digits-torch"), "onnx": ("digits-torch",)}


def check_image(image: Image, models_dir: Path) -> None:
    name, port = f"serving-check-{image.role}", free_port()
    docker("rm", "-f", name, check=False)
    models = SERVED[image.role]
    sample = json.loads((models_dir / models[0] / "1" / "sample.json").read_text())
    try:
        run_container(image, name, port, models_dir, f"SERVING_MODEL={models[0]}",
                      f"SERVING_MODELS={','.join(models)}")
        ready = guarded(image, "the default container (WSGI front, process mode)",
                        lambda: check_running(image, name, port, models, sample))
        if ready:
            guarded(image, "docker stop drains an in-flight request", lambda: check_drain(image, name, port, sample))
        else:
            image.record("docker stop drains an in-flight request", False, "not run: the server never became ready")
    finally:
        docker("rm", "-f", name, check=False)
    guarded(image, "the ASGI front in batched mode", lambda: check_asgi_front(image, models_dir, models[0], sample))


def guarded(image: Image, check: str, run: Callable[[], object]) -> object:
    """``run()``, or a FAIL row for ``check`` when the checker itself fails (a refused connection, a timeout)."""
    try:
        return run()
    except (OSError, ValueError, KeyError, IndexError, subprocess.SubprocessError) as exc:
        image.record(check, False, f"the check stopped: {type(exc).__name__}: {exc}")
        return None


def check_asgi_front(image: Image, models_dir: Path, model: str, sample: dict) -> None:
    """Both fronts are in both images: asgi_server:app under the uvicorn worker, batched mode (greenlets)."""
    name, port = f"serving-check-{image.role}-asgi", free_port()
    docker("rm", "-f", name, check=False)
    run_container(image, name, port, models_dir, f"SERVING_MODEL={model}", f"SERVING_MODELS={model}",
                  "SERVING_FRONT=asgi", "SERVING_MODE=batched")
    try:
        waited = wait_until(lambda: request(port, "GET", "/health/ready")[0] == 200, 180)
        if waited is None:
            image.record("ASGI front, batched mode: a prediction is right", False, "not ready within 180 s")
            print(docker("logs", name, check=False).stderr[-4000:])
            return
        code, body = request(port, "POST", "/predict/label", json.dumps({"data": [sample["data"]]}).encode(),
                             {"Content-Type": "application/json"})
        predicted = json.loads(body).get("prediction", [None])[0] if code == 200 else body[:200].decode()
        server = docker("exec", name, "sh", "-c", "cat /proc/1/cmdline | tr '\\0' ' '").stdout.strip()
        image.record("ASGI front, batched mode: a prediction is right", code == 200 and predicted == sample["label"],
                     f"ready after {waited:.1f} s; POST /predict/label ({model}) -> {code}, {predicted!r}"
                     f" (expected {sample['label']!r}); PID 1: {server}")
    finally:
        docker("rm", "-f", name, check=False)


def check_running(image: Image, name: str, port: int, models: tuple[str, ...], sample: dict) -> bool:
    """The checks of a running server; False when it never became ready (the rest are then not run)."""
    waited = wait_until(lambda: request(port, "GET", "/health/ready")[0] == 200, 180)
    if not image.record("/health/ready turns 200", waited is not None,
                        f"after {waited:.1f} s" if waited is not None else "not within 180 s"):
        print(docker("logs", name, check=False).stderr[-4000:])
        return False
    status = docker("exec", name, "sh", "-c", "id -u; id -g; grep '^Uid:' /proc/1/status").stdout.split()
    uid, gid, pid1_uid = status[0], status[1], status[3]
    image.record("runs as non-root", uid != "0" and pid1_uid != "0",
                 f"uid {uid}, gid {gid}; PID 1 (the gunicorn master) uid {pid1_uid}")
    write = docker("exec", name, "sh", "-c", "touch /models/probe 2>&1", check=False)
    image.record("/models is not writable by the server", write.returncode != 0,
                 write.stdout.strip().splitlines()[-1] if write.stdout.strip() else f"touch exit {write.returncode}")
    healthy = wait_until(lambda: docker("inspect", "-f", "{{.State.Health.Status}}", name).stdout.strip()
                         == "healthy", 60)
    image.record("Docker HEALTHCHECK reports healthy", healthy is not None,
                 f"{healthy + waited:.1f} s after start" if healthy is not None else "not within 60 s")
    code, body = request(port, "POST", "/predict/label", json.dumps({"data": [sample["data"]]}).encode(),
                      {"Content-Type": "application/json"})
    predicted = json.loads(body).get("prediction", [None])[0] if code == 200 else body[:200].decode()
    image.record("a prediction is right", code == 200 and predicted == sample["label"],
                 f"POST /predict/label ({models[0]}) -> {code}, {predicted!r} (expected {sample['label']!r})")
    health = docker("exec", name, "python", "-c", GRPC_HEALTH, f"127.0.0.1:{GRPC_PORTS[name]}", check=False)
    image.record("gRPC health answers SERVING", health.stdout.strip() == "SERVING",
                 f"grpc.health.v1 Check on 127.0.0.1:{GRPC_PORTS[name]} -> "
                 f"{health.stdout.strip() or health.stderr.strip()[-200:]}")
    for model in models:
        code, body = request(port, "GET", f"/v2/models/{model}")
        meta = json.loads(body) if code == 200 else {}
        image.record("v2 metadata answers", code == 200 and meta.get("name") == model and bool(meta.get("inputs")),
                     f"GET /v2/models/{model} -> {code}, platform {meta.get('platform')!r}, inputs "
                     f"{[(t.get('name'), t.get('shape')) for t in meta.get('inputs', [])]}")
    logs = docker("logs", name)
    lines = [line for line in (logs.stdout + logs.stderr).splitlines() if line.strip()]
    plain = [line for line in lines if not _is_json_object(line)]
    foreign = [line for line in plain if TENSORFLOW_NATIVE.match(line)]
    bad = [line for line in plain if line not in foreign]
    image.record("every log line of the server is JSON", bool(lines) and not bad,
                 f"{len(lines)} lines ({len(logs.stdout.splitlines())} on stdout, {len(logs.stderr.splitlines())} on"
                 f" stderr); not JSON: {bad[:2]}" + (f"; {len(foreign)} plain lines from TensorFlow's C++ runtime"
                                                    f" (absl), e.g. {foreign[-1][:90]!r}" if foreign else ""))
    probe = "; ".join(f"command -v {tool}" for tool in TOOLS)
    found = docker("exec", name, "sh", "-c", f"{probe}; true").stdout.split()
    image.record("no compiler, pip or test tool", not found, f"found: {found}" if found else
                 f"none of {', '.join(TOOLS)} on PATH")
    modules = "torch", "tensorflow", "keras", "onnxruntime", "pytest", "locust"
    script = ("import importlib\nfor m in " f"{modules!r}" ":\n    try:\n        importlib.import_module(m)\n"
              "        print(m)\n    except ImportError:\n        pass")
    present = docker("exec", name, "python", "-c", script, timeout=300).stdout.split()
    expected = {"onnxruntime"} if image.role == "onnx" else {"torch", "tensorflow", "keras", "onnxruntime"}
    image.record("Python packages as intended", set(present) == expected, f"import succeeds: {present}")
    return True


#: What TensorFlow's C++ runtime writes itself when it loads (absl logging, before any Python logging): the
#: "oneDNN custom operations are on" notice and absl's warning about it. TF_CPP_MIN_LOG_LEVEL does not stop
#: them; TF_ENABLE_ONEDNN_OPTS=0 does, at a cost measured below (oneDNN's kernels off).
TENSORFLOW_NATIVE = re.compile(r"^(WARNING: All log messages before absl::InitializeLog\(\)"
                               r"|[IWE]\d{4} [\d:. ]+\d+ \S+\.cc:\d+\])")


def measure_onednn(image: Image) -> str:
    """The bare TensorFlow call with oneDNN's custom operations on (TensorFlow's default) and off, on one core."""
    rows = []
    for flag in ("1", "0"):
        result = docker("run", "--rm", "--cpuset-cpus", "0", "-e", f"TF_ENABLE_ONEDNN_OPTS={flag}", image.tag,
                        "serving", "bench", "--model", "digits-tf", "--batch-sizes", "1,32", "--seconds", "3",
                        "--math-threads", "1", timeout=300)
        p50 = {line.split()[0]: line.split()[2] for line in result.stdout.splitlines()[2:] if line.split()}
        rows.append(f"TF_ENABLE_ONEDNN_OPTS={flag}: p50 {p50.get('1')} us at batch 1, {p50.get('32')} us at batch 32")
    return ("TensorFlow's oneDNN switch in the full image (serving bench, digits-tf, 1 core, median per call): "
            + "; ".join(rows) + ".")


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def check_drain(image: Image, name: str, port: int, sample: dict) -> None:
    """A request whose body is still arriving when ``docker stop`` sends SIGTERM must still be answered."""
    body = json.dumps({"data": [sample["data"]]}).encode()
    head = (f"POST /predict/label HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    client = socket.create_connection(("127.0.0.1", port), timeout=30)
    client.sendall(head + body[: len(body) // 2])
    time.sleep(0.5)  # a worker has accepted the connection and waits for the rest of the body
    started = time.monotonic()
    stopper = subprocess.Popen([DOCKER, "stop", name], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(2.0)  # SIGTERM is delivered: the master has closed its listener, the worker drains
    late: socket.socket | None = None
    try:  # a client arriving during the drain
        late = socket.create_connection(("127.0.0.1", port), timeout=10)
        late.sendall(head + body)
    except OSError as exc:
        late_outcome = f"refused ({type(exc).__name__})"
    client.sendall(body[len(body) // 2:])
    answer = b""
    while chunk := client.recv(65536):
        answer += chunk
    client.close()
    if late is not None:
        try:
            late_answer = late.recv(65536)
            late_outcome = (f"answered {late_answer.split(b' ', 2)[1].decode()}" if late_answer else
                            "accepted by the kernel, then closed without an answer")
        except OSError as exc:
            late_outcome = f"accepted by the kernel, then {type(exc).__name__} when the worker exited"
        late.close()
    stopper.wait(60)
    elapsed = time.monotonic() - started
    status_line = answer.split(b"\r\n", 1)[0].decode(errors="replace")
    payload = answer.partition(b"\r\n\r\n")[2]
    try:
        predicted = json.loads(payload)["prediction"][0]
    except (ValueError, KeyError, IndexError):
        predicted = None
    exit_code = docker("inspect", "-f", "{{.State.ExitCode}}", name).stdout.strip()
    ok = status_line.endswith("200 OK") and predicted == sample["label"] and exit_code == "0" and elapsed < 10
    image.record("docker stop drains an in-flight request", ok,
                 f"{status_line!r}, {predicted!r}; container exit {exit_code} {elapsed:.1f} s after docker stop"
                 f" (its default timeout is 10 s). A request sent on a new connection during the drain:"
                 f" {late_outcome}")


def check_no_model(image: Image) -> None:
    """Nothing at /models: the container must exit with one clear line, not serve or crash-loop silently."""
    name, port = f"serving-check-{image.role}-empty", free_port()
    docker("rm", "-f", name, check=False)
    docker("run", "-d", "--name", name, "--network", "host", "-e", f"SERVING_BIND=127.0.0.1:{port}",
           "-e", f"SERVING_GRPC_BIND=127.0.0.1:{free_port()}", image.tag)
    try:
        exited = wait_until(lambda: docker("inspect", "-f", "{{.State.Status}}", name).stdout.strip() == "exited", 60)
        code = docker("inspect", "-f", "{{.State.ExitCode}}", name).stdout.strip()
        logs = docker("logs", name)
        lines = (logs.stdout + logs.stderr).splitlines()
        line = next((line for line in lines if "cannot start" in line), "")
        image.record("refuses to start without a model", exited is not None and code != "0" and "/models" in line,
                     f"exit {code} after {exited or 0:.1f} s; log line: {line.strip()}")
    finally:
        docker("rm", "-f", name, check=False)


def size_mb(tag: str) -> float:
    return int(docker("image", "inspect", "-f", "{{.Size}}", tag).stdout.strip()) / 1e6


def write_report(path: Path, images: list[Image], base: str, notes: list[str]) -> None:
    lines = [f"# Container images: deploy/test-image.sh, {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC", "",
             f"Base image: `{base}` ({size_mb(base):,.0f} MB). Built with the legacy builder, `--network host`.", "",
             "| image | models | size |", "| --- | --- | --- |"]
    lines += [f"| `{image.tag}` ({image.role}) | {image.models} | {size_mb(image.tag):,.0f} MB |" for image in images]
    lines += ["", *notes, "", "| image | check | result | detail |", "| --- | --- | --- | --- |"]
    for image in images:
        for check, ok, detail in image.rows:
            lines.append(f"| {image.role} | {check} | {'pass' if ok else '**FAIL**'} | {detail.replace('|', '/')} |")
    failed = sum(not ok for image in images for _, ok, _ in image.rows)
    total = sum(len(image.rows) for image in images)
    lines += ["", f"{total - failed} of {total} checks passed."]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print(f"report: {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", action="append", required=True, help="ROLE=TAG:baked|mounted")
    parser.add_argument("--models", type=Path, default=Path("models"), help="the repository mounted at /models")
    parser.add_argument("--base", required=True, help="the base image, for the report")
    parser.add_argument("--note", action="append", default=[], help="a line for the report (build times)")
    parser.add_argument("--report", type=Path, required=True)
    options = parser.parse_args()
    images = []
    for spec in options.image:
        role, _, rest = spec.partition("=")
        tag, _, models = rest.rpartition(":")
        images.append(Image(role, tag, models))
    notes = list(options.note)
    for image in images:
        check_image(image, options.models)
        if image.models == "mounted":
            guarded(image, "refuses to start without a model", partial(check_no_model, image))
        if image.role == "full":
            try:
                notes.append(measure_onednn(image))
            except (OSError, ValueError, subprocess.SubprocessError) as exc:
                notes.append(f"TensorFlow's oneDNN switch was not measured: {type(exc).__name__}: {exc}")
    write_report(options.report, images, options.base, notes)
    return 0 if all(ok for image in images for _, ok, _ in image.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
