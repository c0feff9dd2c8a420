"""Security of the deployment around the app: TLS, the nginx front (deploy/nginx.conf), gunicorn's own
error pages, half-open connections, the unix socket's mode, the metrics directory and ``serving stop``.

Everything runs for real: gunicorn, Debian's nginx, TLS with certificates made here by openssl.
"""

from __future__ import annotations

import http.client
import os
import re
import selectors
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest
import requests

from serving.tools.testing import stop_group
from tests.asgi_support import FRONTS
from tests.conftest import GUNICORN, PYTHON, ROOT, GunicornServer, clean_env, free_port

pytestmark = pytest.mark.slow
SAMPLE = orjson.dumps({"data": [0.0] * 64})
JSON = {"Content-Type": "application/json"}
NGINX_CONF = ROOT / "deploy" / "nginx.conf"
ONNX = {"model": "digits-torch", "backend": "onnx"}


# --- helpers -------------------------------------------------------------------------------------------

def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def make_certificates(folder: Path) -> dict[str, Path]:
    """A test CA and a server certificate it signed, for localhost and 127.0.0.1 (EC P-256: fast)."""
    folder.mkdir(parents=True, exist_ok=True)
    key = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
    openssl("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=serving test CA",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign", cwd=folder)
    openssl("req", *key, "-keyout", "key.pem", "-out", "server.csr", "-subj", "/CN=localhost", cwd=folder)
    (folder / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "cert.pem", "-days", "2", "-extfile", "server.ext", cwd=folder)
    return {"ca": folder / "ca.pem", "cert": folder / "cert.pem", "key": folder / "key.pem"}


def nginx_binary() -> str:
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        pytest.fail("nginx is not installed: .ci/run installs it with apt-get install nginx")
    return binary


def render_nginx(folder: Path, upstream_port: int, port: int, tls: dict[str, Path] | None = None,
                 tls_port: int = 0, edit: Callable[[str], str] = lambda conf: conf, grpc_upstream_port: int = 0,
                 grpc_port: int = 0, grpc_tls_port: int = 0) -> Path:
    """deploy/nginx.conf with the test's ports (and, with ``tls``, its #tls lines enabled) in ``folder``."""
    conf = NGINX_CONF.read_text().replace("127.0.0.1:8000", f"127.0.0.1:{upstream_port}")
    conf = conf.replace("127.0.0.1:8080", f"127.0.0.1:{port}")
    conf = conf.replace("127.0.0.1:8001", f"127.0.0.1:{grpc_upstream_port or free_port()}")
    conf = conf.replace("127.0.0.1:8081", f"127.0.0.1:{grpc_port or free_port()}")
    conf = conf.replace("127.0.0.1:8444", f"127.0.0.1:{grpc_tls_port or free_port()}")
    conf = conf.replace("worker_processes auto;", "worker_processes 1;\ndaemon off;")
    if tls is not None:
        conf = re.sub(r"^#tls ", "", conf, flags=re.MULTILINE).replace("127.0.0.1:8443", f"127.0.0.1:{tls_port}")
        conf = conf.replace("/etc/serving/tls/cert.pem", str(tls["cert"])).replace("/etc/serving/tls/key.pem",
                                                                                  str(tls["key"]))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "nginx.conf").write_text(edit(conf))
    return folder / "nginx.conf"


def connectable(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Nginx:
    """A real nginx from deploy/nginx.conf in front of ``upstream_port``; stopped and cleaned up on exit.

    Its prefix is a fresh directory others may traverse: started as root, nginx's workers run as
    ``nobody`` and must reach client_body_temp_path (pytest's own tmp folders are private to root).
    """

    def __init__(self, upstream_port: int, grpc_upstream_port: int = 0, **render: Any) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="serving-nginx-"))
        self.folder.chmod(0o755)
        self.port = free_port()
        self.tls_port = free_port() if render.get("tls") else 0
        self.grpc_port, self.grpc_tls_port = free_port(), free_port()
        try:
            self.conf = render_nginx(self.folder, upstream_port, self.port, tls_port=self.tls_port,
                                     grpc_upstream_port=grpc_upstream_port, grpc_port=self.grpc_port,
                                     grpc_tls_port=self.grpc_tls_port, **render)
        except BaseException:
            shutil.rmtree(self.folder, ignore_errors=True)
            raise
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def errors(self) -> str:
        return (self.folder / "nginx.err").read_text(errors="replace")

    def check(self) -> subprocess.CompletedProcess[str]:
        """``nginx -t`` on the rendered file."""
        return subprocess.run([nginx_binary(), "-t", "-c", str(self.conf), "-p", str(self.folder)],
                              capture_output=True, text=True, timeout=30, check=False)

    def __enter__(self) -> Nginx:
        with open(self.folder / "nginx.err", "wb") as errors:
            self.proc = subprocess.Popen([nginx_binary(), "-c", str(self.conf), "-p", str(self.folder)],
                                         stderr=errors)
        try:
            wait_until(lambda: connectable(self.port) or self.proc.poll() is not None, 10, "nginx listening")
            assert self.proc.poll() is None, self.errors()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        shutil.rmtree(self.folder, ignore_errors=True)


def raw_exchange(port: int, data: bytes, timeout: float = 5.0, source: str = "") -> bytes:
    """Send ``data`` on a fresh connection; everything read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                  source_address=(source, 0) if source else None) as sock:
        sock.sendall(data)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
        return reply


def head_and_body(reply: bytes) -> tuple[int, dict[str, list[str]], bytes]:
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return int(lines[0].split()[1]), headers, body


def assert_json_error(reply: bytes, status: int) -> dict[str, Any]:
    code, headers, body = head_and_body(reply)
    assert code == status, reply[:300]
    assert headers["content-type"] == ["application/json"], reply[:300]
    assert headers["x-content-type-options"] == ["nosniff"], reply[:300]
    payload: dict[str, Any] = orjson.loads(body)
    assert list(payload) == ["error"] and payload["error"], payload
    return payload


def start_https(server: GunicornServer, ca: Path) -> str:
    """Start a server that serves HTTPS (the harness waits over plain HTTP) and wait until it is ready."""
    server.start(wait=False)
    https = f"https://127.0.0.1:{server.port}"

    def ready() -> bool:
        assert server.proc is not None and server.proc.poll() is None, server.log()
        try:
            return bool(requests.get(https + "/health/ready", verify=ca, timeout=2).ok)
        except requests.RequestException:
            return False

    wait_until(ready, 60, f"HTTPS answers:\n{server.log()}")
    return https


def worker_pids(master: int) -> set[int]:
    return {child.pid for child in psutil.Process(master).children()}


@pytest.fixture(scope="module")
def upstream(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GunicornServer]:
    """One real server (process mode, 2 workers) that the nginx tests put a front on."""
    with GunicornServer(model_repo, tmp_path_factory.mktemp("upstream"), mode="process", workers=2, **ONNX) as server:
        yield server


@pytest.fixture(scope="module")
def front(upstream: GunicornServer) -> Iterator[Nginx]:
    """deploy/nginx.conf, as shipped, in front of ``upstream``."""
    with Nginx(upstream.port) as nginx:
        yield nginx


# --- TLS ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["process", "threaded"])
def test_tls_gunicorn_serves_https_from_the_settings(server_factory: Any, tmp_path: Path, mode: str) -> None:
    certs = make_certificates(tmp_path / "tls")
    server = server_factory(mode=mode, workers=1, certfile=certs["cert"], keyfile=certs["key"], **ONNX)
    https = start_https(server, certs["ca"])
    answer = requests.post(https + "/predict/label", data=SAMPLE, headers=JSON, verify=certs["ca"], timeout=5)
    assert answer.status_code == 200 and len(answer.json()["prediction"]) == 1
    with pytest.raises(requests.exceptions.SSLError):  # verified against the CA, not blindly trusted
        requests.get(https + "/health", timeout=5)
    try:
        plain = requests.get(f"http://127.0.0.1:{server.port}/health", timeout=5)
    except requests.ConnectionError:
        pass  # what happens: gunicorn expects a TLS handshake and closes the connection
    else:
        assert plain.status_code >= 400 and "status" not in plain.text, plain.text
    assert requests.get(https + "/health", verify=certs["ca"], timeout=5).ok, "the worker lives on"


def test_tls_files_that_cannot_serve_are_refused_at_start(model_repo: Path, tmp_path: Path) -> None:
    certs = make_certificates(tmp_path / "tls")
    for certfile, keyfile, reason in ((certs["cert"], certs["ca"].with_name("ca.key"), "KEY_VALUES_MISMATCH"),
                                      (certs["cert"], tmp_path / "missing.pem", "No such file")):
        env = clean_env(SERVING_MODEL_REPOSITORY=str(model_repo), SERVING_CERTFILE=str(certfile),
                        SERVING_KEYFILE=str(keyfile), SERVING_BIND=f"127.0.0.1:{free_port()}")
        result = subprocess.run([GUNICORN, "-c", "gunicorn.conf.py", "flask_server:app"], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
        assert "cannot serve TLS" in result.stderr and reason in result.stderr, result.stderr


def test_tls_nginx_block_validates_and_serves_https(upstream: GunicornServer, tmp_path: Path) -> None:
    certs = make_certificates(tmp_path / "tls")
    with Nginx(upstream.port, tls=certs) as nginx:
        checked = nginx.check()
        assert checked.returncode == 0 and "test is successful" in checked.stderr, checked.stderr
        https = f"https://localhost:{nginx.tls_port}"
        answer = requests.post(https + "/predict/label", data=SAMPLE, headers=JSON, verify=certs["ca"], timeout=5)
        assert answer.status_code == 200 and len(answer.json()["prediction"]) == 1
        assert answer.headers["Server"] == "nginx"
        # No SNI name of ours (an IP address, a scanner): the default server refuses the handshake itself.
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(f"https://127.0.0.1:{nginx.tls_port}/health", verify=certs["ca"], timeout=5)


# --- the nginx front --------------------------------------------------------------------------------------

def test_nginx_drops_requests_for_unknown_hosts(front: Nginx) -> None:
    started = time.monotonic()
    for request in (b"GET /health HTTP/1.1\r\nHost: rebind.attacker.example\r\n\r\n",
                    b"GET /health HTTP/1.0\r\n\r\n"):  # no Host at all
        assert raw_exchange(front.port, request) == b"", "closed without an answer (444)"
    assert time.monotonic() - started < 2.0
    known = raw_exchange(front.port, b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    assert known.startswith(b"HTTP/1.1 200")


def test_nginx_answers_json_413_and_hides_its_version(front: Nginx) -> None:
    ok = requests.get(front.url + "/health", timeout=5)
    assert ok.status_code == 200 and ok.headers["Server"] == "nginx"
    assert ok.raw.headers.getlist("X-Content-Type-Options") == ["nosniff"], "exactly one nosniff"
    huge = requests.post(front.url + "/predict/label", data=b"x" * (3 * 2**20), headers=JSON, timeout=10)
    assert huge.status_code == 413 and huge.headers["Content-Type"] == "application/json"
    assert huge.headers["Server"] == "nginx" and huge.headers["X-Content-Type-Options"] == "nosniff"
    assert "limit" in huge.json()["error"]


def test_nginx_spills_large_bodies_to_disk_not_memory(front: Nginx) -> None:
    body = orjson.dumps({"data": [[0.0] * 64] * 3000})  # ~0.6 MB: over the 16 KiB buffer, under the cap
    answer = requests.post(front.url + "/predict", data=body, headers=JSON, timeout=10)
    assert answer.status_code in (200, 413, 422), answer.text  # the server's own answer, whichever it is
    wait_until(lambda: "buffered to a temporary file" in front.errors(), 5, "nginx buffering the body on disk")


def test_nginx_answers_json_when_the_server_is_down() -> None:
    with Nginx(free_port()) as nginx:  # nothing listens upstream
        reply = raw_exchange(nginx.port, b"GET /metadata HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    assert "answering" in assert_json_error(reply, 502)["error"]


def test_nginx_refuses_a_connection_flood_fast_and_serves_other_clients(front: Nginx) -> None:
    """40 requests held open from one address: 16 proceed (limit_conn), 24 get a JSON 429 at once."""
    flood, allowed = 40, 16
    head = (b"POST /predict/label HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n")  # the body never comes: nginx holds each request reading it
    with ExitStack() as stack, selectors.DefaultSelector() as selector:
        socks = [stack.enter_context(socket.create_connection(("127.0.0.1", front.port), timeout=5))
                 for _ in range(flood)]
        started = time.monotonic()
        for sock in socks:
            sock.sendall(head)
            selector.register(sock, selectors.EVENT_READ)
        replies: list[bytes] = []
        while len(replies) < flood - allowed and time.monotonic() - started < 3.0:
            for key, _ in selector.select(timeout=0.1):
                selector.unregister(key.fileobj)
                replies.append(key.fileobj.recv(65536))  # type: ignore[union-attr]
        assert len(replies) == flood - allowed and time.monotonic() - started < 3.0, len(replies)
        for reply in replies:
            assert "too many" in assert_json_error(reply, 429)["error"]
        time.sleep(0.3)
        assert not selector.select(timeout=0), "the other 16 are still held, unanswered"
        # Another client (another address) is served meanwhile.
        other = http.client.HTTPConnection("127.0.0.1", front.port, timeout=5, source_address=("127.0.0.2", 0))
        try:
            other.request("POST", "/predict/label", body=SAMPLE, headers={**JSON, "Host": "localhost"})
            assert other.getresponse().status == 200
        finally:
            other.close()


def test_nginx_rate_limit_answers_json_429(upstream: GunicornServer) -> None:
    """The shipped zone (200 r/s, burst 400) lowered here to 1 r/s, burst 5, to reach it in a few requests."""
    def lowered(conf: str) -> str:
        assert "rate=200r/s" in conf and "burst=400" in conf
        return conf.replace("rate=200r/s", "rate=1r/s").replace("burst=400", "burst=5")

    with Nginx(upstream.port, edit=lowered) as nginx, requests.Session() as session:
        statuses = [session.get(nginx.url + "/health", timeout=5) for _ in range(10)]
    assert [r.status_code for r in statuses[:6]] == [200] * 6
    refused = [r for r in statuses if r.status_code == 429]
    assert len(refused) >= 3 and refused[0].headers["Content-Type"] == "application/json"
    assert refused[0].headers["Retry-After"] == "1" and "too many" in refused[0].json()["error"]


# --- half-open connections ---------------------------------------------------------------------------------

def test_half_open_requests_behind_nginx_cost_the_server_nothing(server_factory: Any) -> None:
    server = server_factory(mode="process", workers=1, **ONNX).start()
    workers = worker_pids(server.pid)
    with Nginx(server.port) as nginx, ExitStack() as stack:
        for _ in range(20):  # 20 heads that never end, against one sync worker
            sock = stack.enter_context(socket.create_connection(("127.0.0.1", nginx.port), timeout=5))
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")
        time.sleep(0.3)
        for _ in range(20):
            started = time.monotonic()
            assert requests.post(nginx.url + "/predict/label", data=SAMPLE, headers=JSON, timeout=5).ok
            assert time.monotonic() - started < 0.5
    assert worker_pids(server.pid) == workers and "WORKER TIMEOUT" not in server.log()


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
@pytest.mark.parametrize("mode", ["process", "threaded"])
def test_half_open_requests_hold_a_worker_only_briefly(server_factory: Any, tmp_path: Path, mode: str,
                                                         tls: bool) -> None:
    """Direct exposure: a silent client holds a sync worker (or a gthread thread) at most timeout / 3.

    Before: the sync worker stayed blocked until the master killed it (WORKER TIMEOUT, models reloaded);
    a gthread thread stayed blocked for ever. With TLS, a handshake left unfinished counts as silence too.
    """
    slots = 1 if mode == "process" else 2
    settings: dict[str, Any] = {"mode": mode, "workers": 1, "threads": slots, "timeout": 3, **ONNX}  # silence: 1 s
    if tls:
        certs = make_certificates(tmp_path / "tls")
        server = server_factory(certfile=certs["cert"], keyfile=certs["key"], **settings)
        url = start_https(server, certs["ca"])
        client_tls = ssl.create_default_context(cafile=str(certs["ca"]))
    else:
        server = server_factory(**settings).start()
        url = server.url
    workers = worker_pids(server.pid)
    # Plain: half a request head per request slot. TLS: a finished handshake then half a head, and the
    # first bytes of a ClientHello then nothing; one sync worker serves them in turn, two threads at once.
    kinds = ["tls-head", "hello"] if tls else ["head"] * slots
    with ExitStack() as stack:
        for kind in kinds:
            sock = stack.enter_context(socket.create_connection(("127.0.0.1", server.port), timeout=5))
            if kind == "tls-head":
                sock = stack.enter_context(client_tls.wrap_socket(sock, server_hostname="127.0.0.1"))
            sock.sendall(b"\x16\x03\x01\x02\x00\x01" if kind == "hello" else b"GET /health HTTP/1.1\r\nHost: x\r\n")
        time.sleep(0.2)
        started = time.monotonic()
        answer = requests.post(url + "/predict/label", data=SAMPLE, headers=JSON, timeout=15,
                               verify=str(certs["ca"]) if tls else True)
        waited = time.monotonic() - started
    in_turn = len(kinds) // slots  # silent connections each slot serves before ours
    assert answer.status_code == 200 and waited < in_turn * 1.0 + 0.8, waited
    assert worker_pids(server.pid) == workers and "WORKER TIMEOUT" not in server.log()


# --- gunicorn's own error pages -----------------------------------------------------------------------------

@pytest.mark.parametrize(("mode", "front"), [("process", "wsgi"), ("threaded", "wsgi"), ("threaded", "asgi")])
def test_gunicorn_error_pages_are_json(server_factory: Any, mode: str, front: str) -> None:
    """What the server answers before the app sees a request, on the sync and gthread workers and on the
    ASGI front's uvicorn worker (whose own answers would be plain text, and which has no head limits)."""
    server = server_factory(mode=mode, workers=1, **ONNX, **FRONTS[front]).start()
    cases = {
        400: b"GARBAGE\r\n\r\n",
        414: b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        431: b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(101)) + b"\r\n",
    }
    for status, request in cases.items():
        assert_json_error(raw_exchange(server.port, request), status)
    big_field = assert_json_error(raw_exchange(server.port, b"GET / HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n"), 431)
    assert len(big_field["error"]) < 300
    assert requests.get(server.url + "/health", timeout=5).ok, "the worker lives on"


def test_an_endless_header_is_refused_without_growing_the_asgi_worker(server_factory: Any) -> None:
    """A head that never ends (one header line of 8 MiB, never finished) is cut off at the head limit."""
    server = server_factory(mode="threaded", workers=1, **ONNX, **FRONTS["asgi"]).start()
    worker = psutil.Process(server.pid).children()[0]
    before = worker.memory_info().rss
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Endless: ")
        reply = b""
        try:
            for _ in range(128):
                sock.sendall(b"a" * 65536)
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            while chunk := sock.recv(65536):
                reply += chunk
        except ConnectionResetError:
            pass
    assert "head" in assert_json_error(reply, 431)["error"]
    assert worker.memory_info().rss - before < 16 * 2**20, "the worker buffered the endless header"
    assert requests.get(server.url + "/health", timeout=5).ok, "the worker lives on"


# --- unix socket ----------------------------------------------------------------------------------------------

def test_unix_socket_is_not_world_writable(model_repo: Path, tmp_path: Path) -> None:
    path = tmp_path / "serving.sock"
    env = clean_env(SERVING_MODEL_REPOSITORY=str(model_repo), SERVING_BIND=f"unix:{path}", SERVING_WORKERS="1",
                    SERVING_MODEL="digits-torch", SERVING_BACKEND="onnx")
    with open(tmp_path / "server.log", "wb") as log:
        proc = subprocess.Popen([GUNICORN, "-c", "gunicorn.conf.py", "flask_server:app"], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def answers() -> bool:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            if not path.exists():
                return False
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(2)
                sock.connect(str(path))
                sock.sendall(b"GET /health/ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                return sock.recv(64).startswith(b"HTTP/1.1 200")

        wait_until(answers, 60, "the unix socket answering")
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o007 == 0, f"socket mode {mode:o}: others may connect"
    finally:
        stop_group(proc)


# --- the metrics directory ----------------------------------------------------------------------------------------

def test_metrics_dir_holding_other_files_is_refused_and_left_alone(model_repo: Path, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "other-app.db").write_bytes(b"not ours")
    (shared / "counter_123.db").write_bytes(b"another prometheus app's")
    env = clean_env(SERVING_MODEL_REPOSITORY=str(model_repo), SERVING_METRICS_DIR=str(shared),
                    SERVING_BIND=f"127.0.0.1:{free_port()}", **{"SERVING_" + k.upper(): v for k, v in ONNX.items()})
    result = subprocess.run([GUNICORN, "-c", "gunicorn.conf.py", "flask_server:app"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"the metrics directory {shared} holds files this server did not write" in result.stderr
    assert sorted(p.name for p in shared.iterdir()) == ["counter_123.db", "other-app.db"]


def test_metrics_dir_of_its_own_is_wiped_of_metric_files_only(server_factory: Any, tmp_path: Path) -> None:
    own = tmp_path / "metrics"
    first = server_factory(metrics_dir=own, workers=1, **ONNX).start()
    assert requests.post(first.url + "/predict/label", data=SAMPLE, headers=JSON, timeout=5).ok
    first.stop()
    stale = {p.name for p in own.glob("*.db")}
    assert stale and (own / ".serving-metrics").exists()
    (own / "README.txt").write_text("a note someone left")
    second = server_factory(metrics_dir=own, workers=1, **ONNX).start()
    assert not stale & {p.name for p in own.glob("*.db")}, "the previous run's files are gone"
    assert (own / "README.txt").read_text() == "a note someone left"
    assert requests.get(second.url + "/metrics", timeout=5).ok


# --- serving stop ------------------------------------------------------------------------------------------------

def serving_stop(pid_file: Path, timeout: float = 40) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "serving.host.stop", "--pid", str(pid_file), "--timeout", str(timeout)],
                          cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=timeout + 20, check=False)


@contextmanager
def unrelated_process() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "60"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(10)


def test_stop_refuses_pid_files_that_do_not_name_the_server(tmp_path: Path) -> None:
    pid_file = tmp_path / "server.pid"
    result = serving_stop(pid_file)
    assert result.returncode == 1 and "no pid file" in result.stderr
    with unrelated_process() as sleeper:
        pid_file.write_text(f"{sleeper.pid}\n")  # a stale file whose pid now names something else
        result = serving_stop(pid_file)
        assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
        assert f"process {sleeper.pid} (sleep 60) is not gunicorn" in result.stderr
        assert sleeper.poll() is None, "the unrelated process was not signalled"
        assert pid_file.exists()
    pid_file.write_text(f"{sleeper.pid}\n")  # now no process at all: the stale file goes
    result = serving_stop(pid_file)
    assert result.returncode == 1 and "not running" in result.stderr and not pid_file.exists()


def test_stop_stops_a_real_daemon(model_repo: Path, tmp_path: Path) -> None:
    port = free_port()
    pid_file = tmp_path / "server.pid"
    env = clean_env(SERVING_MODEL_REPOSITORY=str(model_repo), SERVING_LOG_FILE=str(tmp_path / "server.log"),
                    SERVING_MODEL="digits-torch", SERVING_BACKEND="onnx")
    started = subprocess.run([GUNICORN, "flask_server:app", "-w", "1", "-b", f"127.0.0.1:{port}", "--daemon",
                              "--pid", str(pid_file)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
                             check=False)
    assert started.returncode == 0, started.stderr
    pid = 0
    try:
        wait_until(pid_file.exists, 30, "the pid file")
        pid = int(pid_file.read_text())
        wait_until(lambda: len(psutil.Process(pid).children()) == 1, 30, "the worker")
        worker = psutil.Process(pid).children()[0].pid
        other = tmp_path / "worker.pid"
        other.write_text(str(worker))
        result = serving_stop(other)
        assert result.returncode == 1 and "a gunicorn worker, not the master" in result.stderr
        written = pid_file.stat().st_mtime
        os.utime(pid_file, (written - 3600, written - 3600))  # a pid file older than the process: a reused pid
        result = serving_stop(pid_file)
        assert result.returncode == 1 and "started after" in result.stderr and psutil.pid_exists(pid)
        os.utime(pid_file, (written, written))
        result = serving_stop(pid_file)
        assert result.returncode == 0, result.stderr
        assert f"stopped the server (pid {pid})" in result.stdout
        assert not pid_file.exists()
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # no reaping init
    finally:
        if pid and psutil.pid_exists(pid):
            os.killpg(os.getpgid(pid), signal.SIGKILL)


def test_tls_and_api_keys_end_to_end_with_curl(server_factory: Any, tmp_path: Path) -> None:
    """What a user types: curl over HTTPS (verified against the CA) with and without the key."""
    certs = make_certificates(tmp_path / "tls")
    key = "curl-key-" + "c" * 16
    server = server_factory(workers=1, certfile=certs["cert"], keyfile=certs["key"], api_keys=key, **ONNX)
    https = start_https(server, certs["ca"])

    def curl(*extra: str) -> tuple[int, str]:
        result = subprocess.run(["curl", "-sS", "--cacert", str(certs["ca"]), "-o", "-", "-w", "\n%{http_code}",
                                 https + "/predict/label", "-H", "Content-Type: application/json",
                                 "--data-binary", SAMPLE.decode(), *extra],
                                capture_output=True, text=True, timeout=30, check=True)
        body, _, status = result.stdout.rpartition("\n")
        return int(status), body

    status, body = curl()
    assert status == 401 and "API key" in body
    status, body = curl("-H", f"Authorization: Bearer {key}")
    assert status == 200 and orjson.loads(body)["prediction"]
