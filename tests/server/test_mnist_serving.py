"""Real MNIST served end to end: the classic ``/inference`` client contract, 8-bit pixels in every
protocol, and the served model's accuracy on all 10,000 t10k digits equal to what training reported and
at least 0.99, the target of the default model.

Real gunicorn on loopback; the model is the default one, trained once per session by ``python train.py``
with no option (``mnist_repo`` in conftest.py), and these tests skip where MNIST is absent.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest
import requests

from serving.toolchain.data import load_mnist
from tests.conftest import GunicornServer
from tests.mnist_support import mnist_dir

pytestmark = pytest.mark.slow
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def t10k() -> tuple[np.ndarray, np.ndarray]:
    """The t10k images as the 0-255 bytes MNIST stores, and their labels."""
    dataset = load_mnist(mnist_dir())
    return np.rint(dataset.x_test * 255).astype(np.uint8), dataset.y_test


@pytest.fixture(scope="module")
def server(mnist_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GunicornServer]:
    with GunicornServer(mnist_repo, tmp_path_factory.mktemp("mnist"), model="mnist-torch", backend="pytorch",
                        workers=2) as srv:
        yield srv


def test_the_classic_client_gets_the_digit_as_plain_text(server: GunicornServer, t10k: tuple) -> None:
    images, labels = t10k
    assert labels[0] == 7
    # What the classic Flask MNIST client does, unchanged: post 0-255 pixels, print the body.
    answer = requests.post(server.url + "/inference", json={"images": images[0].tolist()}, timeout=10)
    assert answer.status_code == 200 and answer.text == "7"
    assert answer.headers["Content-Type"].startswith("text/plain") and answer.headers["X-Request-ID"]
    swagger = requests.post(server.url + "/inference/", json={"images": images[0].tolist()}, timeout=10)
    assert swagger.status_code == 200 and swagger.json() == 7 and swagger.headers["Content-Type"] == "application/json"
    batch = requests.post(server.url + "/inference", json={"images": images[:3].tolist()}, timeout=10)
    assert batch.text.split("\n") == [str(v) for v in labels[:3]]
    assert requests.post(server.url + "/inference/", json={"images": images[:3].tolist()}, timeout=10).json() \
        == labels[:3].tolist()


@pytest.mark.parametrize(("body", "status", "message"), [
    ({"images": [[300] * 28] * 28}, 422, "must lie in [0, 255]"),
    ({"images": [[0.5] * 28] * 27}, 422, "has shape [27, 28]"),
    ({"data": [[0] * 28] * 28}, 422, 'needs an "images" field'),
    ([1, 2], 422, "must be a JSON object"),
])
def test_the_classic_contract_refuses_like_the_native_api(server: GunicornServer, body: object, status: int,
                                                           message: str) -> None:
    for path in ("/inference", "/inference/"):
        answer = requests.post(server.url + path, data=orjson.dumps(body), headers=JSON, timeout=10)
        assert answer.status_code == status and message in answer.json()["error"], answer.text
    form = requests.post(server.url + "/inference", data={"images": "1"}, timeout=10)
    assert form.status_code == 415 and form.json()["error"]


def test_8bit_pixels_in_every_protocol_give_the_same_answer(server: GunicornServer, t10k: tuple) -> None:
    images, _ = t10k
    sample = images[:4]
    native = requests.post(server.url + "/predict", json={"data": sample.tolist(), "pixel_range": [0, 255]},
                           timeout=10).json()["prediction"]
    scaled = requests.post(server.url + "/predict", json={"data": (sample / 255.0).tolist()},
                           timeout=10).json()["prediction"]
    header = orjson.dumps({"inputs": [{"name": "input", "shape": [4, 28, 28], "datatype": "UINT8",
                                       "parameters": {"binary_data_size": sample.size}}]})
    v2 = requests.post(server.url + "/v2/models/mnist-torch/infer", data=header + sample.tobytes(),
                       headers={"Inference-Header-Content-Length": str(len(header)),
                                "Content-Type": "application/octet-stream"}, timeout=10)
    assert v2.status_code == 200, v2.text
    probabilities = np.asarray(v2.json()["outputs"][0]["data"], dtype=np.float32).reshape(4, 10)
    assert np.allclose(native, scaled, atol=1e-6) and np.allclose(native, probabilities, atol=1e-6)
    still_refused = requests.post(server.url + "/predict", json={"data": sample.tolist()}, timeout=10)
    assert still_refused.status_code == 422 and "[0, 1]" in still_refused.json()["error"]
    bad_range = requests.post(server.url + "/predict", json={"data": sample.tolist(), "pixel_range": [255, 0]},
                              timeout=10)
    assert bad_range.status_code == 422 and "pixel_range" in bad_range.json()["error"]


def test_all_10000_t10k_digits_at_the_accuracy_training_reported(server: GunicornServer, mnist_repo: Path,
                                                                 t10k: tuple) -> None:
    images, labels = t10k
    meta = orjson.loads((mnist_repo / "mnist-torch" / "1" / "metadata.json").read_bytes())
    assert meta["test_samples"] == 10_000
    predicted: list[str] = []
    with requests.Session() as session:
        for start in range(0, len(images), 64):
            answer = session.post(server.url + "/predict/label", timeout=30,
                                  json={"data": images[start:start + 64].tolist(), "pixel_range": [0, 255]})
            assert answer.status_code == 200, answer.text
            predicted += answer.json()["prediction"]
    accuracy = float(np.mean(np.asarray(predicted) == labels.astype(str)))
    assert abs(accuracy - meta["test_accuracy"]) <= 2 / 10_000, (accuracy, meta["test_accuracy"])
    assert accuracy >= 0.99, accuracy  # the default model's target (issue 26)
    assert (meta["arch"], meta["epochs"], meta["train_samples"]) == ("lenet", 2, 60_000)
