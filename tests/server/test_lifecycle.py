"""Start-up and shutdown through real gunicorn: fail fast, load after fork, daemon mode, preload."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

from serving.observability.memory import tree_memory
from tests.conftest import GUNICORN, ROOT, clean_env, free_port

pytestmark = pytest.mark.slow
FRAMEWORK_LIBS = ("libtensorflow", "_pywrap_tensorflow", "libtorch", "onnxruntime_pybind")


def loaded_libraries(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def run_until_exit(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GUNICORN, "-c", "gunicorn.conf.py", *args, "flask_server:app"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_with_sharing_off_the_master_never_imports_a_framework_but_workers_do(server_factory: Any) -> None:
    # SERVING_SHARE_MEMORY=true (the default) imports it in the master on purpose: tests/server/test_memory.py
    for backend, model, marker in (("tensorflow", "digits-tf", "tensorflow"), ("pytorch", "digits-torch", "libtorch"),
                                   ("onnx", "digits-tf", "onnxruntime")):
        server = server_factory(model=model, backend=backend, share_memory="false", args=("--preload",)).start()
        assert requests.get(server.url + "/predict/test/label", timeout=10).json()["correct"] is True
        master_maps = loaded_libraries(server.pid)
        assert not any(lib in master_maps for lib in FRAMEWORK_LIBS), f"{backend}: master loaded a framework"
        workers = psutil.Process(server.pid).children()
        assert len(workers) == 2
        assert all(marker in loaded_libraries(w.pid) for w in workers), f"{backend}: workers did not load it"
        server.stop()


def test_missing_model_stops_at_start_with_a_clear_message(tmp_path: Path) -> None:
    env = clean_env(SERVING_MODEL_REPOSITORY=str(tmp_path / "empty"), SERVING_BIND=f"127.0.0.1:{free_port()}")
    started = time.monotonic()
    result = run_until_exit(env)
    assert result.returncode != 0
    assert time.monotonic() - started < 30, "no respawn loop"
    assert f"no model in {tmp_path / 'empty'}/: train one (`python train.py`)" in result.stderr
    assert "Traceback" not in result.stderr


def test_tampered_artifact_is_refused(repo_copy: Path) -> None:
    artifact = repo_copy / "digits-tf" / "1" / "model.onnx"
    artifact.write_bytes(artifact.read_bytes() + b"\0")
    env = clean_env(SERVING_MODEL_REPOSITORY=str(repo_copy), SERVING_BACKEND="onnx",
                    SERVING_BIND=f"127.0.0.1:{free_port()}")
    result = run_until_exit(env)
    assert result.returncode != 0
    assert "was modified after training" in result.stderr and "Traceback" not in result.stderr


def test_corrupt_metadata_is_refused(repo_copy: Path) -> None:
    (repo_copy / "digits-tf" / "1" / "metadata.json").write_text("{not json")
    env = clean_env(SERVING_MODEL_REPOSITORY=str(repo_copy), SERVING_BIND=f"127.0.0.1:{free_port()}")
    result = run_until_exit(env)
    assert result.returncode != 0 and "metadata.json of " in result.stderr and "is corrupt" in result.stderr


def test_corrupt_artifact_with_matching_checksum_stops_workers_without_respawn_loop(repo_copy: Path) -> None:
    """A file that passes the checksum but cannot be loaded: the worker fails to boot, the master halts."""
    import orjson

    version = repo_copy / "digits-tf" / "1"
    (version / "model.onnx").write_bytes(b"not an onnx model")
    meta = orjson.loads((version / "metadata.json").read_bytes())
    from serving.store.repository import sha256_file

    meta["artifacts"]["model.onnx"]["sha256"] = sha256_file(version / "model.onnx")
    (version / "metadata.json").write_bytes(orjson.dumps(meta))
    env = clean_env(SERVING_MODEL_REPOSITORY=str(repo_copy), SERVING_BACKEND="onnx",
                    SERVING_BIND=f"127.0.0.1:{free_port()}")
    result = run_until_exit(env)
    assert result.returncode != 0
    assert "cannot load the model" in result.stderr and "failed to boot" in result.stderr.lower()


def test_pytorch_refuses_threaded_mode_in_one_line(model_repo: Path) -> None:
    env = clean_env(SERVING_MODEL_REPOSITORY=str(model_repo), SERVING_MODEL="digits-torch", SERVING_MODE="threaded",
                    SERVING_BIND=f"127.0.0.1:{free_port()}")
    result = run_until_exit(env)
    assert result.returncode != 0
    assert "the pytorch backend is process-only" in result.stderr


def test_pytorch_refuses_threads_given_on_the_command_line(model_repo: Path) -> None:
    env = clean_env(SERVING_MODEL_REPOSITORY=str(model_repo), SERVING_MODEL="digits-torch",
                    SERVING_BIND=f"127.0.0.1:{free_port()}")
    result = run_until_exit(env, "--threads", "4")
    assert result.returncode != 0 and "process-only" in result.stderr


def test_invalid_setting_stops_with_how_to_fix() -> None:
    env = clean_env(SERVING_WORKERS="two")
    result = run_until_exit(env)
    assert result.returncode != 0
    assert "SERVING_WORKERS='two' is not a whole number" in result.stderr and "Traceback" not in result.stderr


def test_command_line_flags_override_the_config_file(server_factory: Any) -> None:
    server = server_factory(workers=3, args=("-w", "1"))
    server.env["SERVING_WORKERS"] = "1"  # what wait_ready expects
    server.start()
    roles = [process.role for process in tree_memory(server.pid)]
    assert roles.count("worker") == 1, roles  # (TensorFlow's model pool adds its own processes)


def test_daemon_start_and_stop_with_pid_file(model_repo: Path, tmp_path: Path) -> None:
    port = free_port()
    pid_file = ROOT / "run" / f"test-{port}.pid"
    log_file = tmp_path / "server.log"
    env = clean_env(SERVING_MODEL_REPOSITORY=str(model_repo), SERVING_LOG_FILE=str(log_file), SERVING_WORKERS="2")
    started = subprocess.run(
        [GUNICORN, "flask_server:app", "-w", "2", "-b", f"127.0.0.1:{port}", "--daemon", "--pid", str(pid_file)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert started.returncode == 0, started.stderr
    pid = 0
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if requests.get(f"http://127.0.0.1:{port}/predict/test/label", timeout=2).json().get("correct"):
                    break
            except requests.RequestException:
                time.sleep(0.2)
        pid = int(pid_file.read_text())
        assert psutil.pid_exists(pid)
        requests.get(f"http://127.0.0.1:{port}/health", headers={"X-Request-ID": "daemon-check"}, timeout=5)
        os.kill(pid, signal.SIGTERM)  # what the README says: kill $(cat run/server.pid)
        deadline = time.monotonic() + 30
        while psutil.pid_exists(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not psutil.pid_exists(pid), "daemon did not stop"
        assert not pid_file.exists(), "the pid file is removed on shutdown"
        log = log_file.read_text()
        assert "daemon-check" in log and "loaded model" in log
    finally:
        if pid and psutil.pid_exists(pid):
            os.kill(pid, signal.SIGKILL)
        pid_file.unlink(missing_ok=True)


def test_daemon_without_log_setting_writes_run_server_log(model_repo: Path) -> None:
    port = free_port()
    pid_file = ROOT / "run" / f"test-{port}.pid"
    log_file = ROOT / "run" / "server.log"
    offset = log_file.stat().st_size if log_file.exists() else 0
    env = clean_env(SERVING_MODEL_REPOSITORY=str(model_repo), SERVING_WORKERS="1")
    subprocess.run([GUNICORN, "flask_server:app", "-b", f"127.0.0.1:{port}", "--daemon", "--pid", str(pid_file)],
                   cwd=ROOT, env=env, check=True, timeout=60)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not pid_file.exists():
            time.sleep(0.1)
        while time.monotonic() < deadline:
            try:
                requests.get(f"http://127.0.0.1:{port}/predict/test/label", timeout=2)
                break
            except requests.RequestException:
                time.sleep(0.2)
        with open(log_file, "rb") as handle:
            handle.seek(offset)
            assert b"loaded model" in handle.read()
    finally:
        if pid_file.exists():
            os.kill(int(pid_file.read_text()), signal.SIGTERM)
            time.sleep(1)
            pid_file.unlink(missing_ok=True)
