"""Integration: real gunicorn for each backend x mode, every endpoint, answers checked against the model."""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import requests
from PIL import Image

from serving.backends import backend_class
from serving.store.repository import ModelRepository
from serving.toolchain.data import load_digits_dataset
from tests.conftest import GunicornServer

pytestmark = pytest.mark.slow

CONFIGS = [
    ("digits-tf", "tensorflow", "process"),
    ("digits-tf", "tensorflow", "threaded"),
    ("digits-torch", "pytorch", "process"),
    ("digits-torch", "onnx", "process"),
    ("digits-tf", "onnx", "threaded"),
]


@pytest.fixture(scope="module")
def digits() -> Any:
    return load_digits_dataset(seed=0)


@pytest.fixture(scope="module", params=CONFIGS, ids=["-".join(c) for c in CONFIGS])
def server(request: pytest.FixtureRequest, model_repo: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[GunicornServer, Any]]:
    model, backend, mode = request.param
    srv = GunicornServer(model_repo, tmp_path_factory.mktemp("logs"), model=model, backend=backend, mode=mode,
                         threads=4, max_batch=32)
    srv.start()
    meta = ModelRepository(model_repo).resolve(model)
    direct = backend_class(backend)(meta, math_threads=1)
    direct.load()
    try:
        yield srv, direct
    finally:
        srv.stop()


def post_json(url: str, payload: Any, headers: dict[str, str] | None = None) -> requests.Response:
    return requests.post(url, data=orjson.dumps(payload), timeout=10,
                         headers={"Content-Type": "application/json", **(headers or {})})


def test_health_metadata_labels(server: tuple[GunicornServer, Any]) -> None:
    srv, direct = server
    health = requests.get(srv.url + "/health", timeout=5)
    assert health.status_code == 200 and health.json()["model_loaded"] is True
    meta = requests.get(srv.url + "/metadata", timeout=5).json()
    assert meta["name"] == direct.metadata.name and meta["backend"] == direct.name
    assert meta["input"]["shape"] == [8, 8] and meta["input"]["range"] == [0.0, 1.0]
    assert meta["input"]["max_batch"] == 32 and "contract" in meta["input"]
    assert meta["accuracy"] >= 0.9
    assert requests.get(srv.url + "/label", timeout=5).json()["labels"] == [str(i) for i in range(10)]


def test_predictions_match_the_model_run_directly(server: tuple[GunicornServer, Any], digits: Any) -> None:
    srv, direct = server
    batch = digits.x_test[:32]
    expected = direct.predict(batch)
    answer = post_json(srv.url + "/predict", {"data": batch.tolist()})
    assert answer.status_code == 200, answer.text
    got = np.asarray(answer.json()["prediction"], dtype=np.float32)
    assert got.shape == (32, 10)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    labels = post_json(srv.url + "/predict/label", {"data": batch.reshape(32, 64).tolist()}).json()["prediction"]
    assert labels == [str(i) for i in expected.argmax(axis=1)]
    accuracy = np.mean(np.asarray(labels, dtype=int) == digits.y_test[:32])
    assert accuracy >= 0.85


def test_single_sample_flat_and_nested(server: tuple[GunicornServer, Any], digits: Any) -> None:
    srv, direct = server
    sample = digits.x_test[5]
    expected = str(direct.predict(sample[None]).argmax())
    for data in (sample.tolist(), sample.reshape(64).tolist()):
        body = post_json(srv.url + "/predict/label", {"data": data, "id": "abc"}).json()
        assert body == {"prediction": [expected], "id": "abc"}


def test_concurrent_clients_get_their_own_answers(server: tuple[GunicornServer, Any], digits: Any) -> None:
    srv, direct = server
    expected = direct.predict(digits.x_test[:48]).argmax(axis=1)

    def ask(i: int) -> str:
        body = post_json(srv.url + "/predict/label", {"data": digits.x_test[i].tolist()}).json()
        return str(body["prediction"][0])

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(48)))
    assert answers == [str(e) for e in expected]


def test_builtin_sample_and_image_upload(server: tuple[GunicornServer, Any], digits: Any) -> None:
    srv, direct = server
    smoke = requests.get(srv.url + "/predict/test/label", timeout=5).json()
    assert smoke["correct"] is True and smoke["prediction"] == smoke["expected"]
    # A 64x64 PNG of a test digit, dark ink on white as people draw it: converted back to 8x8.
    sample = digits.x_test[0]
    ink = np.kron(sample, np.ones((8, 8)))
    png = io.BytesIO()
    Image.fromarray(((1.0 - ink) * 255).astype(np.uint8)).save(png, format="PNG")
    expected = str(direct.predict(sample[None]).argmax())
    raw = requests.post(srv.url + "/predict/label", data=png.getvalue(), headers={"Content-Type": "image/png"},
                        timeout=10)
    assert raw.status_code == 200 and raw.json()["prediction"] == [expected]
    multipart = requests.post(srv.url + "/predict/label", files={"file": ("d.png", png.getvalue(), "image/png")},
                              timeout=10)
    assert multipart.status_code == 200 and multipart.json()["prediction"] == [expected]


def test_request_id_is_echoed_or_generated(server: tuple[GunicornServer, Any]) -> None:
    srv, _ = server
    mine = "req-" + uuid.uuid4().hex
    assert requests.get(srv.url + "/health", headers={"X-Request-ID": mine}, timeout=5).headers["X-Request-ID"] == mine
    generated = requests.get(srv.url + "/health", headers={"X-Request-ID": "bad id\twith spaces"}, timeout=5)
    assert generated.headers["X-Request-ID"] != "bad id\twith spaces" and len(generated.headers["X-Request-ID"]) == 32
    answer = post_json(srv.url + "/predict/label", {"data": [0.0] * 64}, headers={"X-Request-ID": mine})
    assert answer.json()["id"] == mine
    assert mine in srv.log(), "the access line carries the request id"
