"""The package as a user installs it: a wheel in a fresh virtualenv, the ``serving`` command, a real server.

The wheel is built from this checkout and installed with ``--no-deps`` into a new venv that sees the
test environment's site-packages only as a plain path (so its dependencies resolve without a
download, and this checkout is not importable: the commands run from a temporary directory).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import ROOT, clean_env, free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("package")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(work / "dist"), str(ROOT)], check=True, capture_output=True, timeout=300)
    wheel = next((work / "dist").glob("serving-*.whl"))
    env_dir = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True, timeout=120)
    site = next(env_dir.glob("lib/python*/site-packages"))
    (site / "test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # a path, not a site dir
    subprocess.run([str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, capture_output=True, timeout=300)
    return env_dir


def run(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(venv / "bin" / "serving"), *args], cwd=cwd, env=clean_env(), capture_output=True,
                          text=True, timeout=120, check=False)


def test_the_installed_package_is_imported_from_the_venv_not_the_checkout(venv: Path, tmp_path: Path) -> None:
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import serving; print(serving.__file__)"],
                           cwd=tmp_path, env=clean_env(), capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(venv)) and not where.startswith(str(ROOT))


def test_the_serving_command(venv: Path, tmp_path: Path) -> None:
    usage = run(venv, "--help", cwd=tmp_path)
    assert usage.returncode == 0 and all(f"serving {c}" in usage.stdout for c in ("serve", "train", "config", "bench"))
    config = run(venv, "config", cwd=tmp_path)
    assert config.returncode == 0 and "SERVING_MAX_BATCH_SIZE" in config.stdout
    bad = subprocess.run([str(venv / "bin" / "serving"), "config"], cwd=tmp_path, capture_output=True, text=True,
                         env=clean_env(SERVING_WORKERS="none"), check=False)
    assert bad.returncode == 2 and "SERVING_WORKERS='none' is not a whole number" in bad.stderr
    unknown = run(venv, "frobnicate", cwd=tmp_path)
    assert unknown.returncode == 2 and "unknown command" in unknown.stderr


def test_serving_bench_measures_the_bare_model_call(venv: Path, model_repo: Path, tmp_path: Path) -> None:
    result = run(venv, "bench", "--model", "digits-torch", "--backend", "onnx", "--repository", str(model_repo),
                 "--batch-sizes", "1,8", "--seconds", "0.2", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line.split() for line in result.stdout.splitlines()[2:]]
    assert [row[0] for row in rows] == ["1", "8"] and all(float(row[-1].replace(",", "")) > 0 for row in rows)


def test_serving_serve_runs_the_packaged_config_outside_the_checkout(venv: Path, model_repo: Path,
                                                                       tmp_path: Path) -> None:
    port = free_port()
    env = clean_env(SERVING_MODEL_REPOSITORY=str(model_repo), SERVING_BACKEND="onnx", SERVING_MODEL="digits-torch",
                    SERVING_WORKERS="1", SERVING_BIND=f"127.0.0.1:{port}")
    with open(tmp_path / "server.log", "wb") as log:
        proc = subprocess.Popen([str(venv / "bin" / "serving"), "serve", "--no-control-socket"], cwd=tmp_path,
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                if requests.get(f"http://127.0.0.1:{port}/health/ready", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.2)
        answer = requests.post(f"http://127.0.0.1:{port}/predict/label", json={"data": [0.0] * 64}, timeout=10)
        assert answer.status_code == 200 and len(answer.json()["prediction"]) == 1
        page = requests.get(f"http://127.0.0.1:{port}/", timeout=10)  # the web page ships as package data
        assert page.status_code == 200 and "/assets/app.js?v=" in page.text and requests.get(
            f"http://127.0.0.1:{port}/assets/app.js", timeout=10).text.startswith("// The front page")
        log = (tmp_path / "server.log").read_text()
        assert "serving digits-torch version 1 (onnx backend, process)" in log  # the packaged config's hooks ran
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
