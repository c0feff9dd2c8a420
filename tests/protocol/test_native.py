"""The native API in process, through the Flask test client: every endpoint, input form and error case.

The fast layer (``make test-fast``): no server, no sockets. The same requests through real gunicorn
are in tests/server/test_server.py and tests/server/test_errors.py; what only a real server shows (signals,
workers, sockets) is tested there.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from flask import Flask
from flask.testing import FlaskClient
from PIL import Image

from serving.config import Settings
from serving.toolchain.data import load_digits_dataset
from tests.protocol.conftest import serve_in_process

MAX_BODY = 16 * 1024


@pytest.fixture(scope="module")
def app(model_repo: Path) -> Iterator[Flask]:
    yield from serve_in_process(Settings.from_env(
        {}, model_repository=model_repo, model="digits-torch", backend="onnx", workers=1, max_batch=8,
        max_body_bytes=MAX_BODY, access_log=False,
    ))


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    data = load_digits_dataset(seed=0)
    return data.x_test[:8].astype(np.float32), data.y_test[:8]


def png(pixels: np.ndarray, scale: int = 4, dark_on_light: bool = False) -> bytes:
    """An upload as a person would make it: larger than the model's input, 8-bit grayscale."""
    image = (pixels * 255).astype(np.uint8)
    if dark_on_light:
        image = 255 - image
    buffer = io.BytesIO()
    Image.fromarray(image).resize((image.shape[1] * scale, image.shape[0] * scale), Image.Resampling.NEAREST) \
        .save(buffer, format="PNG")
    return buffer.getvalue()


def post_json(client: FlaskClient, path: str, payload: Any, **headers: str) -> Any:
    return client.post(path, data=orjson.dumps(payload), headers={"Content-Type": "application/json", **headers})


def test_probabilities_and_labels_agree(client: FlaskClient, digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digits
    probabilities = post_json(client, "/predict", {"data": x.tolist()})
    labels = post_json(client, "/predict/label", {"data": x.reshape(8, -1).tolist()})
    assert probabilities.status_code == labels.status_code == 200
    p = np.asarray(probabilities.json["prediction"])
    assert p.shape == (8, 10) and np.allclose(p.sum(axis=1), 1.0, atol=1e-4)
    assert labels.json["prediction"] == [str(i) for i in p.argmax(axis=1)]
    assert np.mean(p.argmax(axis=1) == y) >= 0.75  # a trained model, not noise


@pytest.mark.parametrize("sample", ["flat", "nested"])
def test_one_sample_flat_or_nested(client: FlaskClient, digits: tuple[np.ndarray, np.ndarray], sample: str) -> None:
    x = digits[0][0]
    data = x.reshape(-1).tolist() if sample == "flat" else x.tolist()
    answer = post_json(client, "/predict/label", {"data": data})
    assert answer.status_code == 200 and len(answer.json["prediction"]) == 1


def test_ids(client: FlaskClient, digits: tuple[np.ndarray, np.ndarray]) -> None:
    data = digits[0][0].tolist()
    assert post_json(client, "/predict/label", {"data": data, "id": "mine"}).json["id"] == "mine"
    assert post_json(client, "/predict/label", {"data": data, "id": 7}).json["id"] == 7
    echoed = post_json(client, "/predict/label", {"data": data}, **{"X-Request-ID": "trace-1"})
    assert echoed.json["id"] == "trace-1" and echoed.headers["X-Request-ID"] == "trace-1"
    replaced = post_json(client, "/predict/label", {"data": data, "id": True}, **{"X-Request-ID": "bad id!"})
    new_id = replaced.headers["X-Request-ID"]
    assert len(new_id) == 32 and int(new_id, 16) >= 0 and replaced.json["id"] == new_id


def test_images_as_body_and_multipart(client: FlaskClient, digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = digits
    expected = post_json(client, "/predict/label", {"data": x[:1].tolist()}).json["prediction"]
    body = client.post("/predict/label", data=png(x[0]), content_type="image/png")
    dark = client.post("/predict/label", data=png(x[0], dark_on_light=True), content_type="image/png")
    form = client.post("/predict/label", data={"file": (io.BytesIO(png(x[0])), "digit.png")},
                       content_type="multipart/form-data")
    assert body.status_code == dark.status_code == form.status_code == 200
    assert body.json["prediction"] == dark.json["prediction"] == form.json["prediction"]
    assert len(expected) == 1


@pytest.mark.parametrize(("body", "content_type", "status", "message"), [
    (b"{bad", "application/json", 400, "malformed JSON"),
    (b"", "application/json", 400, "the body is empty"),
    (b"[1, 2]", "application/json", 422, "must be a JSON object"),
    (b'{"x": 1}', "application/json", 422, 'needs a "data" field'),
    (b'{"data": [1, 2, 3]}', "application/json", 422, "has shape [3]"),
    (b'{"data": [[1, 2], [3]]}', "application/json", 422, "rectangular"),
    (orjson.dumps({"data": ["a"] * 64}), "application/json", 422, "only numbers"),
    (orjson.dumps({"data": [2.0] * 64}), "application/json", 422, "must lie in [0, 1]"),
    (b'{"data": []}', "application/json", 422, "the batch is empty"),
    (orjson.dumps({"data": [[0.0] * 64] * 9}), "application/json", 422, "the limit is 8"),
    (b'{"data": [1e999]}', "application/json", 400, "malformed JSON"),
    (b"data=1", "application/x-www-form-urlencoded", 415, "is not accepted"),
    (b"not an image", "image/png", 400, "not a readable image"),
    (b"x" * (MAX_BODY + 1), "application/json", 413, f"the limit is {MAX_BODY}"),
])
def test_bad_input_gets_a_clear_4xx(client: FlaskClient, body: bytes, content_type: str, status: int,
                                    message: str) -> None:
    answer = client.post("/predict", data=body, content_type=content_type)
    assert answer.status_code == status, answer.data
    assert answer.content_type == "application/json" and message in answer.json["error"], answer.json
    assert answer.headers["X-Request-ID"]


def test_multipart_without_file_and_bad_deadline(client: FlaskClient) -> None:
    answer = client.post("/predict", data={"other": "x"}, content_type="multipart/form-data")
    assert answer.status_code == 400 and "'file'" in answer.json["error"]
    late = post_json(client, "/predict", {"data": [0.0] * 64}, **{"X-Request-Timeout-Ms": "0.5"})
    assert late.status_code == 400 and "X-Request-Timeout-Ms" in late.json["error"]


def test_unknown_paths_and_methods(client: FlaskClient) -> None:
    missing = client.get("/nope")
    assert missing.status_code == 404 and missing.json == {"error": "no endpoint at /nope"}
    wrong = client.get("/predict")
    assert wrong.status_code == 405 and "POST" in wrong.headers["Allow"] and wrong.json["error"]


def test_the_flask_path_answers_like_the_direct_one(client: FlaskClient) -> None:
    """A body without a Content-Length (chunked) is dispatched by Flask: same handler, same answer."""
    for body in (orjson.dumps({"data": [0.0] * 64, "id": "x"}), b"{bad", orjson.dumps({"data": [5.0] * 64})):
        direct = client.post("/predict", data=body, content_type="application/json")
        chunked = client.post("/predict", input_stream=io.BytesIO(body), content_type="application/json",
                              environ_overrides={"wsgi.input_terminated": True, "CONTENT_LENGTH": ""})
        assert not chunked.request.environ.get("CONTENT_LENGTH")
        assert (direct.status_code, direct.json) == (chunked.status_code, chunked.json)


def test_metadata_labels_smoke_test_and_health(client: FlaskClient) -> None:
    meta = client.get("/metadata").json
    assert meta["name"] == "digits-torch" and meta["backend"] == "onnx" and meta["input"]["shape"] == [8, 8]
    assert client.get("/label").json == {"labels": [str(i) for i in range(10)]}
    smoke = client.get("/predict/test/label").json
    assert smoke["correct"] is True and smoke["prediction"] == smoke["expected"]
    assert client.get("/health").json["model_loaded"] is True
    assert client.get("/health/ready").status_code == 200 and client.get("/health/live").status_code == 200


def test_8bit_pixels_with_pixel_range(client: FlaskClient, digits: tuple[np.ndarray, np.ndarray]) -> None:
    x = digits[0][:2]
    pixels = np.rint(x * 255).astype(int)
    as_bytes = post_json(client, "/predict", {"data": pixels.tolist(), "pixel_range": [0, 255]}).json["prediction"]
    as_floats = post_json(client, "/predict", {"data": (pixels / 255).tolist()}).json["prediction"]
    assert np.allclose(as_bytes, as_floats, atol=1e-6)
    for bad in ([0, 0], [255, 0], [0], "0-255", [0, True], [0, float("inf")]):
        refused = client.post("/predict", data=orjson.dumps({"data": pixels.tolist(), "pixel_range": bad},
                                                            option=orjson.OPT_SERIALIZE_NUMPY),
                              headers={"Content-Type": "application/json"})
        assert refused.status_code in (400, 422) and refused.json["error"], bad
    over = post_json(client, "/predict", {"data": [256] * 64, "pixel_range": [0, 255]})
    assert over.status_code == 422 and "[0, 255]" in over.json["error"]


def test_oversized_arrays_are_refused_before_they_are_built(client: FlaskClient) -> None:
    for data in ([[]] * 70_000, [[0.0] * 100_000]):
        answer = post_json(client, "/predict", {"data": data})
        assert answer.status_code in (413, 422), answer.json
    long = post_json(client, "/predict", {"data": [[0.0] * 65] * 2})
    assert long.status_code == 422 and "longer than" in long.json["error"]
