"""Network namespaces, replicas in them and nginx in front: the parts of the replica rehearsal (bench/replicas.py).

Each replica is a real gunicorn server (its own master and worker) in its own network namespace, joined to
the host by a veth pair whose two ends hold the only addresses of 10.<subnet>.<n>.0/24. Everything made here
is removed on the way out (the namespace, the veth pair, the processes).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import requests

from serving.tools.testing import clean_env, free_port, gunicorn_command, stop_group

ROOT = Path(__file__).resolve().parent.parent
NGINX_CONF = ROOT / "deploy" / "replicas" / "nginx.conf"
PORT = 8000


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=30)


@contextmanager
def namespace(name: str, index: int, subnet: int) -> Iterator[str]:
    """A network namespace joined to the host by a veth pair; yields the namespace side's address."""
    host_if, ns_if = f"vh{os.getpid() % 100000}r{index}", f"vn{os.getpid() % 100000}r{index}"
    prefix = f"10.{subnet}.{index}"
    try:
        sh("ip", "netns", "add", name)
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        sh("ip", "link", "set", ns_if, "netns", name)
        sh("ip", "addr", "add", f"{prefix}.1/24", "dev", host_if)
        sh("ip", "link", "set", host_if, "up")
        sh("ip", "netns", "exec", name, "ip", "addr", "add", f"{prefix}.2/24", "dev", ns_if)
        sh("ip", "netns", "exec", name, "ip", "link", "set", ns_if, "up")
        sh("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up")
        yield f"{prefix}.2"
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True, timeout=30, check=False)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30, check=False)


class Replica:
    """One gunicorn server (its own master and workers) in a network namespace, listening on ADDRESS:8000."""

    def __init__(self, name: str, netns: str, address: str, repo: Path, log: Path, **settings: str) -> None:
        self.name, self.netns, self.address, self.log = name, netns, address, log
        variables = {"SERVING_BIND": f"{address}:{PORT}", "SERVING_MODEL_REPOSITORY": str(repo),
                     "SERVING_ALLOWED_HOSTS": "127.0.0.1,localhost", "SERVING_WORKERS": "1"}
        variables.update({f"SERVING_{key.upper()}": value for key, value in settings.items()})
        self.env = clean_env(**variables)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> float:
        """Start the server and wait until its worker has loaded the model; returns the seconds it took."""
        started = time.monotonic()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(["ip", "netns", "exec", self.netns, *gunicorn_command(), "-c",
                                          "gunicorn.conf.py", "flask_server:app"], cwd=ROOT, env=self.env,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        while time.monotonic() - started < timeout:
            assert self.proc.poll() is None, f"{self.name} exited:\n{self.log.read_text()[-3000:]}"
            try:
                if requests.get(f"http://{self.address}:{PORT}/health/ready", timeout=1).status_code == 200:
                    return time.monotonic() - started
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise AssertionError(f"{self.name} not ready after {timeout} s:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL every process of the replica at once, as when a container is killed."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self) -> subprocess.Popen[bytes]:
        """SIGTERM to the master: gunicorn's graceful stop. Returns the process, still draining."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)


@contextmanager
def balancer(work: Path, addresses: Sequence[str], retry_posts: bool = True) -> Iterator[str]:
    """nginx from deploy/replicas/nginx.conf with these replicas and a free port; yields its URL. Without
    ``retry_posts`` nginx's default: a POST already sent to a replica is never retried on another."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    port = free_port()
    conf = NGINX_CONF.read_text()
    servers = "".join(f"        server {address}:{PORT} max_fails=1 fail_timeout=5s;\n" for address in addresses)
    conf = re.sub(r"(        server \S+:8000 [^\n]*\n)+", servers, conf)
    conf = conf.replace("listen 127.0.0.1:8090;", f"listen 127.0.0.1:{port};")
    conf = conf.replace("worker_processes 1;", "worker_processes 1;\ndaemon off;")
    if not retry_posts:
        conf = conf.replace(" non_idempotent;", ";")
    work.mkdir(parents=True, exist_ok=True)
    (work / "nginx.conf").write_text(conf)
    errors = open(work / "nginx.err", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([binary, "-c", str(work / "nginx.conf"), "-p", str(work)], stdout=errors,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                requests.get(f"http://127.0.0.1:{port}/health/live", timeout=1)
                break
            except requests.RequestException:
                assert proc.poll() is None and time.monotonic() < deadline, (work / "nginx.err").read_text()
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)
        errors.close()
