"""Security of the request path: keys and scopes, allowed hosts, bounded metric labels, log lines that
cannot be forged, clamped deadlines, no internals in public bodies. In process (Flask test client)
where the app decides; through real gunicorn where the server, the client library or the log matter.
"""

from __future__ import annotations

import io
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests
import tritonclient.http as triton
from flask import Flask
from flask.testing import FlaskClient

from serving.config import Settings
from serving.errors import ConfigError
from serving.fronts.wsgi import create_app, service_of
from serving.http.security import Gate
from tests import fakes
from tests.conftest import GunicornServer

KEY, ADMIN = "k" * 20 + "-inference", "a" * 20 + "-admin"
SAMPLE = orjson.dumps({"data": [0.0] * 64})
JSON = {"Content-Type": "application/json"}


def make(model_repo: Path, **overrides: Any) -> Flask:
    return create_app(Settings.from_env({}, model_repository=model_repo, backend="onnx", models="digits-tf",
                                        model="digits-torch", workers=1, access_log=False, **overrides))


@pytest.fixture(scope="module")
def keyed(model_repo: Path) -> Iterator[Flask]:
    app = make(model_repo, api_keys=KEY, admin_keys=ADMIN)
    yield app
    service_of(app).close()


@pytest.fixture(scope="module")
def open_app(model_repo: Path) -> Iterator[Flask]:
    app = make(model_repo)
    yield app
    service_of(app).close()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chunked(client: FlaskClient, path: str, body: bytes, headers: dict[str, str]) -> Any:
    """The same POST without a Content-Length: dispatched by Flask instead of the direct route."""
    return client.post(path, input_stream=io.BytesIO(body), headers=headers,
                       environ_overrides={"wsgi.input_terminated": True, "CONTENT_LENGTH": ""})


@pytest.mark.parametrize("path", ["/predict", "/predict/label", "/v2/models/digits-torch/infer"])
def test_api_keys_guard_inference_on_both_dispatch_paths(keyed: Flask, path: str) -> None:
    client = keyed.test_client()
    body = SAMPLE if path.startswith("/predict") else orjson.dumps(
        {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]})
    for send in (lambda h: client.post(path, data=body, headers=h), lambda h: chunked(client, path, body, h)):
        for headers in ({}, bearer("wrong-key-of-some-length"), {"Authorization": KEY}, {"Authorization": "Basic x"}):
            refused = send({**JSON, **headers})
            assert refused.status_code == 401, (path, headers, refused.data)
            assert refused.headers["WWW-Authenticate"].startswith("Bearer")
            assert refused.json == {"error": "this endpoint needs an API key: send Authorization: Bearer <key>"}
        assert send({**JSON, **bearer(KEY)}).status_code == 200
        assert send({**JSON, **bearer(ADMIN)}).status_code == 200  # an operator may run inference too


def test_api_keys_admin_scope_and_open_probes(keyed: Flask) -> None:
    client = keyed.test_client()
    for path in ("/metrics", "/v2/repository/index"):
        assert client.get(path).status_code == 401
        forbidden = client.get(path, headers=bearer(KEY))
        assert forbidden.status_code == 403 and "admin key" in forbidden.json["error"]
        assert client.get(path, headers=bearer(ADMIN)).status_code == 200
    for path in ("/metadata", "/label", "/v2/models/digits-torch", "/predict/test/label"):
        assert client.get(path).status_code == 401 and client.get(path, headers=bearer(KEY)).status_code == 200
    for path in ("/health", "/health/live", "/health/ready", "/v2/health/live", "/v2/health/ready", "/openapi.json"):
        assert client.get(path).status_code == 200, path


def test_api_keys_only_inference_keys_close_admin_endpoints_too(model_repo: Path) -> None:
    app = make(model_repo, api_keys=KEY)
    try:
        client = app.test_client()
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers=bearer(KEY)).status_code == 200
    finally:
        service_of(app).close()


def test_api_keys_from_a_file_and_bad_keys_refused(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"# inference clients\n{KEY}\n\n{'z' * 32}\n")
    gate = Gate(Settings(api_keys_file=str(keys)))
    assert len(gate.inference_keys) == 2 and gate.keys_on
    with pytest.raises(ConfigError, match="at least 16 printable ASCII"):
        Gate(Settings(api_keys="short"))
    with pytest.raises(ConfigError, match="SERVING_ADMIN_KEYS_FILE='/nope' cannot be read"):
        Gate(Settings(admin_keys_file="/nope"))


def test_allowed_hosts_refuse_dns_rebinding_but_not_probes(open_app: Flask) -> None:
    client = open_app.test_client()
    for host in ("localhost", "localhost:8000", "127.0.0.1:9", "[::1]:8000"):
        assert client.post("/predict", data=SAMPLE, headers={**JSON, "Host": host}).status_code == 200, host
    rebound = client.post("/predict", data=SAMPLE, headers={**JSON, "Host": "attacker.example:8000"})
    assert rebound.status_code == 421 and "SERVING_ALLOWED_HOSTS" in rebound.json["error"]
    assert client.get("/metadata", headers={"Host": "attacker.example"}).status_code == 421
    assert client.get("/health/ready", headers={"Host": "10.1.2.3:8000"}).status_code == 200  # kubelet probes


def test_allowed_hosts_setting(model_repo: Path) -> None:
    for setting, host, status in (("*", "anything.example", 200), ("api.example.com", "API.example.com:443", 200),
                                  ("api.example.com", "localhost", 421)):
        app = make(model_repo, allowed_hosts=setting)
        try:
            answer = app.test_client().post("/predict", data=SAMPLE, headers={**JSON, "Host": host})
            assert answer.status_code == status, (setting, host)
        finally:
            service_of(app).close()


def test_security_invented_methods_share_one_metric_label(open_app: Flask) -> None:
    client = open_app.test_client()
    for i in range(50):
        assert client.open("/predict", method=f"QWERTY{i}").status_code == 405
    text = client.get("/metrics").get_data(as_text=True)
    assert "QWERTY" not in text and 'method="other",status="405"' in text


def test_security_no_internals_in_public_bodies(open_app: Flask) -> None:
    client = open_app.test_client()
    for path in ("/health", "/health/live", "/health/ready", "/metadata"):
        body = client.get(path).get_data(as_text=True)
        assert '"pid"' not in body and "onnxruntime" not in body.lower() and "backend_version" not in body, path
    assert len(client.get("/health").json["worker"]) == 12


def test_security_index_lists_unserved_versions_to_admins_only(keyed: Flask, open_app: Flask) -> None:
    admin = {(e["name"], e["version"]) for e in keyed.test_client().get("/v2/repository/index",
                                                                        headers=bearer(ADMIN)).json}
    public = {(e["name"], e["version"]) for e in open_app.test_client().get("/v2/repository/index").json}
    assert public == {("digits-torch", "1"), ("digits-tf", "1")} and admin >= public
    served = service_of(open_app).served
    assert all((name, int(version)) in served for name, version in public)


def test_security_nosniff_and_content_type_required(open_app: Flask) -> None:
    client = open_app.test_client()
    answers = [client.post("/predict", data=SAMPLE, headers=JSON), client.get("/health"), client.get("/nope"),
               client.post("/predict", data=b"{", headers=JSON), chunked(client, "/predict", SAMPLE, JSON)]
    assert all(a.headers["X-Content-Type-Options"] == "nosniff" for a in answers)
    untyped = client.post("/predict", data=SAMPLE, headers={"Content-Type": ""})
    assert untyped.status_code == 415 and "is not accepted" in untyped.json["error"]


def test_security_default_body_cap_is_derived_from_the_model(open_app: Flask) -> None:
    service = service_of(open_app)
    assert service.settings.max_body_bytes == 0 and service.body_limit == 256 * 1024  # 8x8 inputs, max_batch 64
    client = open_app.test_client()
    too_big = client.post("/predict", data=b"[" + b"[]," * 90_000 + b"[]]", headers=JSON)
    assert too_big.status_code == 413 and "262144" in too_big.json["error"]


@pytest.fixture(scope="module")
def server(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GunicornServer]:
    with GunicornServer(model_repo, tmp_path_factory.mktemp("security"), model="digits-torch", models="digits-tf",
                        backend="tests.fakes:FaultyOnnx", workers=1, api_keys=KEY, admin_keys=ADMIN,
                        request_timeout_ms=100) as srv:
        yield srv


@pytest.mark.slow
def test_api_keys_with_tritonclient_curl_style_and_never_logged(server: GunicornServer) -> None:
    client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
    tensor = triton.InferInput("input", [1, 8, 8], "FP32")
    tensor.set_data_from_numpy(__import__("numpy").zeros((1, 8, 8), dtype="float32"), binary_data=True)
    with pytest.raises(triton.InferenceServerException):
        client.infer("digits-torch", [tensor])
    result = client.infer("digits-torch", [tensor], headers=bearer(KEY))
    assert result.as_numpy("probabilities").shape == (1, 10)
    assert requests.get(server.url + "/metrics", headers=bearer(ADMIN), timeout=5).status_code == 200
    time.sleep(0.3)
    assert KEY not in server.log() and ADMIN not in server.log()


@pytest.mark.slow
def test_security_client_deadlines_are_clamped_and_not_logged_as_errors(server: GunicornServer) -> None:
    slow = orjson.dumps({"data": [fakes.SLOW] + [0.0] * 63})  # a 200 ms model call against a 100 ms server cap
    headers = {**JSON, **bearer(KEY), "X-Request-ID": "clamped", "X-Request-Timeout-Ms": "600000"}
    started = time.monotonic()
    answer = requests.post(server.url + "/predict", data=slow, headers=headers, timeout=10)
    assert answer.status_code == 504 and time.monotonic() - started < 1.0
    own = requests.post(server.url + "/predict", data=slow, timeout=10,
                        headers={**headers, "X-Request-ID": "own-deadline", "X-Request-Timeout-Ms": "5"})
    assert own.status_code == 504
    time.sleep(0.3)
    log = server.log()
    assert re.search(r"\[INFO\] \[own-deadline\] POST /predict -> 504", log), log[-2000:]
    assert not re.search(r"\[(ERROR|WARNING)\] \[own-deadline\]", log)


@pytest.mark.slow
def test_security_paths_cannot_forge_log_lines(server: GunicornServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"GET /x%0A[2026-01-01]%20[INFO]%20forged%1B[31m HTTP/1.1\r\nHost: localhost\r\n"
                     b"Connection: close\r\n\r\n")
        reply = sock.recv(65536)
    assert b" 404 " in reply.split(b"\r\n")[0]
    time.sleep(0.3)
    lines = [line for line in server.log().splitlines() if "forged" in line]
    assert len(lines) == 1 and "\x1b" not in lines[0] and "/x\\x0a[2026-01-01] [INFO] forged\\x1b[31m" in lines[0]


def test_security_pinned_digests_catch_a_rewritten_metadata_file(repo_copy: Path) -> None:
    from serving.runtime.service import InferenceService
    from serving.store.repository import sha256_file

    version = repo_copy / "digits-torch" / "1"
    pin = f"digits-torch:1={sha256_file(version / 'metadata.json')}"
    settings = Settings.from_env({}, model_repository=repo_copy, model="digits-torch", backend="onnx")
    InferenceService(Settings.from_env({}, **{**settings.__dict__, "model_sha256": pin})).resolve()
    # An attacker who can write the folder swaps the model and rewrites its recorded sha256 to match:
    (version / "model.onnx").write_bytes((version / "model.onnx").read_bytes() + b"\0")
    meta = orjson.loads((version / "metadata.json").read_bytes())
    meta["artifacts"]["model.onnx"]["sha256"] = sha256_file(version / "model.onnx")
    (version / "metadata.json").write_bytes(orjson.dumps(meta))
    InferenceService(settings).resolve()  # the folder's own checksums cannot tell: they were rewritten too
    with pytest.raises(Exception, match="does not match SERVING_MODEL_SHA256"):
        InferenceService(Settings.from_env({}, **{**settings.__dict__, "model_sha256": pin})).resolve()
    other = "digits-tf:1=" + "0" * 64
    with pytest.raises(Exception, match="SERVING_MODEL_SHA256 pins no digest for digits-torch:1"):
        InferenceService(Settings.from_env({}, **{**settings.__dict__, "model_sha256": other})).resolve()
    with pytest.raises(ConfigError, match="name:version=<64 hex digits>"):
        Settings(model_sha256="digits-torch:1=abc")


def test_security_unlisted_files_such_as_external_data_are_refused(repo_copy: Path) -> None:
    from serving.runtime.service import InferenceService

    (repo_copy / "digits-torch" / "1" / "model.onnx.data").write_bytes(b"weights nobody hashed")
    settings = Settings.from_env({}, model_repository=repo_copy, model="digits-torch", backend="onnx")
    with pytest.raises(Exception, match="model.onnx.data of digits-torch:1 is not listed with a sha256"):
        InferenceService(settings).resolve()


@pytest.mark.parametrize("fmt", ["PCX", "TGA", "ICO", "SGI", "DDS", "JPEG2000", "ICNS", "PPM", "IM", "EPS", "SPIDER"])
def test_security_only_the_advertised_image_formats_are_decoded(open_app: Flask, fmt: str) -> None:
    from PIL import Image

    buffer = io.BytesIO()
    image = Image.new("L", (28, 28), 0)
    (image.convert("RGB") if fmt in ("DDS", "ICNS") else image).save(buffer, format=fmt)
    for content_type in ("image/png", "image/jpeg"):
        answer = open_app.test_client().post("/predict", data=buffer.getvalue(), headers={"Content-Type": content_type})
        assert answer.status_code == 400 and "not a readable image" in answer.json["error"], (fmt, answer.json)


def test_security_broken_decoders_and_text_chunk_bombs_are_400s(open_app: Flask) -> None:
    from PIL import Image, PngImagePlugin

    client = open_app.test_client()
    dds = io.BytesIO()
    Image.new("RGB", (8, 8)).save(dds, format="DDS")
    fuzzed = bytearray(dds.getvalue())
    fuzzed[84:88] = b"XXXX"  # an unknown FourCC: Pillow raises NotImplementedError
    bomb = io.BytesIO()
    info = PngImagePlugin.PngInfo()
    for i in range(40):  # each chunk under Pillow's own 1 MB default, 36 MB inflated in all, ~40 KB on the wire
        info.add_text(f"comment{i}", "a" * 900_000, zip=True)
    Image.new("L", (8, 8)).save(bomb, format="PNG", pnginfo=info)
    assert len(bomb.getvalue()) < 65_536
    for body in (bytes(fuzzed), bomb.getvalue(), b"\x89PNG\r\n\x1a\n" + b"\0" * 100, b"GIF89a" + b"\xff" * 50):
        answer = client.post("/predict", data=body, headers={"Content-Type": "image/png"})
        assert answer.status_code == 400 and "not a readable image" in answer.json["error"], answer.json


@pytest.mark.slow
def test_security_start_up_warns_when_exposed_without_keys(model_repo: Path, tmp_path: Path) -> None:
    """Bound to every interface with no key: one warning at start saying what is exposed (traffic stays on loopback)."""
    for keys, expected in (({}, True), ({"api_keys": KEY}, False)):
        server = GunicornServer(model_repo, tmp_path, model="digits-torch", backend="onnx", workers=1, **keys)
        server.command[server.command.index("-b") + 1] = f"0.0.0.0:{server.port}"
        with server:
            assert requests.get(server.url + "/health/ready", timeout=5).status_code == 200
            warned = "with no API key: anyone who reaches the port can run inference" in server.log()
            assert warned is expected, server.log()[-2000:]


@pytest.mark.slow
def test_api_keys_a_new_key_file_takes_effect_on_reload(model_repo: Path, tmp_path: Path) -> None:
    import signal

    old, new = "old-key-" + "o" * 16, "new-key-" + "n" * 16
    keys = tmp_path / "keys"
    keys.write_text(old + "\n")
    with GunicornServer(model_repo, tmp_path, model="digits-torch", backend="onnx", workers=1,
                        api_keys_file=str(keys)) as server:
        def status(key: str) -> int:
            return requests.post(server.url + "/predict", data=SAMPLE, headers={**JSON, **bearer(key)},
                                 timeout=5).status_code

        assert (status(old), status(new)) == (200, 401)
        keys.write_text(new + "\n")
        assert status(old) == 200  # read once per worker start, not per request
        worker = requests.get(server.url + "/health", timeout=5).json()["worker"]
        os.kill(server.pid, signal.SIGHUP)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                health = requests.get(server.url + "/health", timeout=5).json()
                if health["worker"] != worker and health["model_loaded"]:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.2)
        assert (status(old), status(new)) == (401, 200)
