"""Model control under hostile conditions (issue 23): a file swapped under a pinned digest, a version copied in
file by file, names that are not names on the admin routes, and server paths in answers."""

from __future__ import annotations

import re
import shutil
import socket
import time
from pathlib import Path

import orjson
import pytest
import requests

from serving.store.repository import sha256_file
from tests.conftest import GunicornServer

pytestmark = pytest.mark.slow


def pins(repo: Path, *keys: str) -> str:
    return ",".join(f"{key}={sha256_file(repo / key.replace(':', '/') / 'metadata.json')}" for key in keys)


def index(server: GunicornServer) -> dict[tuple[str, str], dict[str, str]]:
    entries = requests.post(server.url + "/v2/repository/index", timeout=10).json()
    return {(entry["name"], entry["version"]): entry for entry in entries}


def test_a_file_swapped_under_a_pinned_digest_is_refused_at_load(repo_copy: Path, tmp_path: Path) -> None:
    with GunicornServer(repo_copy, tmp_path, model="digits-tf", backend="onnx", workers=2,
                        model_control="explicit",
                        model_sha256=pins(repo_copy, "digits-tf:1", "digits-torch:1")) as server:
        control = server.url + "/v2/repository/models/digits-torch"
        assert requests.post(control + "/load", timeout=60).json()["loaded"] is True
        assert requests.post(control + "/unload", timeout=60).json()["loaded"] is False
        shutil.copy(repo_copy / "digits-tf" / "1" / "model.onnx", repo_copy / "digits-torch" / "1" / "model.onnx")
        again = requests.post(control + "/load", timeout=60)
        assert again.status_code == 409, again.text
        assert "modified after training" in again.json()["error"] and str(repo_copy) not in again.text
        infer = requests.post(server.url + "/v2/models/digits-torch/infer", timeout=10,
                              json={"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                                "data": [0.0] * 64}]})
        assert infer.status_code == 404  # not served: neither the swapped file nor the old one


def test_a_version_copied_in_file_by_file_is_served_once_complete(repo_copy: Path, tmp_path: Path) -> None:
    source, target = repo_copy / "digits-torch" / "1", repo_copy / "digits-torch" / "2"
    with GunicornServer(repo_copy, tmp_path, model="digits-torch", backend="onnx", workers=1,
                        model_control="poll", poll_seconds=0.3) as server:
        target.mkdir()
        meta = orjson.loads((source / "metadata.json").read_bytes())
        (target / "metadata.json").write_bytes(orjson.dumps({**meta, "version": 2}))  # metadata first
        time.sleep(1.0)
        reason = index(server)[("digits-torch", "2")]["reason"]
        assert "model.onnx of digits-torch:2 is missing" in reason and str(repo_copy) not in reason, reason
        for path in source.iterdir():
            if path.name != "metadata.json":
                shutil.copy(path, target / path.name)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and index(server)[("digits-torch", "2")]["state"] != "READY":
            time.sleep(0.2)
        assert index(server)[("digits-torch", "2")]["state"] == "READY"


def test_no_answer_carries_a_server_path(repo_copy: Path, tmp_path: Path) -> None:
    broken = repo_copy / "digits-torch" / "2"
    with GunicornServer(repo_copy, tmp_path, model="digits-torch", backend="onnx", workers=1,
                        model_control="poll", poll_seconds=0.3) as server:
        staging = repo_copy / "digits-torch" / ".staging"
        shutil.copytree(repo_copy / "digits-torch" / "1", staging)
        meta = orjson.loads((staging / "metadata.json").read_bytes())
        (staging / "metadata.json").write_bytes(orjson.dumps({**meta, "version": 2}))
        (staging / "model.onnx").write_bytes(b"not a model")
        staging.rename(broken)
        time.sleep(1.0)
        text = requests.post(server.url + "/v2/repository/index", timeout=10).text
        assert "modified after training" in text and "model.onnx of digits-torch:2" in text
        assert str(repo_copy) not in text and "/tmp" not in text


def raw_post(server: GunicornServer, path: str) -> tuple[int, dict]:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                     .encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), orjson.loads(body) if body else {}


def test_admin_names_are_validated_before_any_path_is_built(repo_copy: Path, tmp_path: Path) -> None:
    (repo_copy.parent / "7").mkdir(exist_ok=True)  # a numeric folder beside the repository: what `..` would probe
    with GunicornServer(repo_copy, tmp_path, model="digits-torch", backend="onnx", workers=1,
                        model_control="explicit") as server:
        for name in ("..", "%2E%2E", "." * 2 + "%2F" + "etc", "a" * 300, "-x", "x%00y"):
            for action in ("load", "unload"):
                status, body = raw_post(server, f"/v2/repository/models/{name}/{action}")
                assert status in (400, 404) and "error" in body, (name, action, status, body)
                assert str(repo_copy) not in str(body)
        time.sleep(0.6)  # two ticks of the watcher
        assert requests.get(server.url + "/health", timeout=5).status_code == 200
        assert "not serving .." not in server.log()
        found = re.search(r"prometheus multiprocess directory (\S+)", server.log())
        assert found, server.log()
        state = Path(found.group(1)) / "control" / "state.json"  # written only by a load that was taken
        assert not state.exists() or ".." not in orjson.loads(state.read_bytes())["models"]
        assert requests.post(server.url + "/v2/repository/models/digits-tf/load", timeout=60).status_code == 200
        assert orjson.loads(state.read_bytes())["models"] == ["digits-torch", "digits-tf"]
