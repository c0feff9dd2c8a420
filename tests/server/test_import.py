"""Bring your own model: ``serving import`` for Keras, SavedModel, TorchScript and ONNX, every refusal as
one line with exit 2, and a TF Serving model folder served as it is, through real gunicorn.

The source models are made here as a user would: the classic Flask MNIST tutorial's Keras network
(Flatten, Dense 128, Dropout, Dense 10 softmax on 0-1 pixels) trained for an epoch on a slice of real
MNIST (random data where MNIST is absent: accuracy is not the point) and saved both as a SavedModel
(``tf.saved_model.save(model, "mnist/1")``) and a ``.keras`` file; a scripted PyTorch module; and an
ONNX graph built by hand with ``onnx.helper`` (weights of a scikit-learn logistic regression).
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import orjson
import pytest
import requests
from PIL import Image

from serving.config import Settings
from serving.errors import ModelLoadError
from serving.runtime.service import InferenceService
from tests.conftest import PYTHON, ROOT, GunicornServer, clean_env

pytestmark = pytest.mark.slow
MAKE_SOURCES = r'''
import os, sys
import numpy as np
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
out, mnist = sys.argv[1], sys.argv[2]
rng = np.random.default_rng(0)
try:
    from serving.toolchain.data import load_mnist
    data = load_mnist(mnist)
    x, y, x_test = data.x_train[:6000], data.y_train[:6000], data.x_test[:64]
except Exception:
    x, y, x_test = rng.uniform(0, 1, (512, 28, 28)).astype("float32"), rng.integers(0, 10, 512), None
np.save(f"{out}/seven.npy", x_test[0] if x_test is not None else x[0])  # t10k's first digit is a 7
import keras, tensorflow as tf
model = keras.Sequential([keras.Input((28, 28)), keras.layers.Flatten(), keras.layers.Dense(128, activation="relu"),
                          keras.layers.Dropout(0.2), keras.layers.Dense(10, activation="softmax")])
model.compile("adam", "sparse_categorical_crossentropy")
model.fit(x, y, epochs=1, verbose=0)
tf.saved_model.save(model, f"{out}/tfserving/mnist/1")
model.save(f"{out}/tutorial.keras")
lambda_model = keras.Sequential([keras.Input((28, 28)), keras.layers.Lambda(lambda t: t * 2.0),
                                 keras.layers.Flatten(), keras.layers.Dense(10)])
lambda_model.save(f"{out}/lambda.keras")
import torch
net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
torch.jit.script(net).save(f"{out}/net.pt")
torch.save(net, f"{out}/pickled.pt")
'''


def onnx_logistic_regression(path: Path, two_inputs: bool = False) -> None:
    """An ONNX classifier written by another tool: scikit-learn's weights in a hand-built MatMul + Add graph
    on flat 8x8 digits, returning logits."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    digits = load_digits()
    fitted = LogisticRegression(max_iter=500).fit(digits.data / 16.0, digits.target)
    weights = numpy_helper.from_array(fitted.coef_.T.astype(np.float32), "W")
    bias = numpy_helper.from_array(fitted.intercept_.astype(np.float32), "B")
    inputs = [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["n", 64])]
    if two_inputs:
        inputs.append(helper.make_tensor_value_info("other", TensorProto.FLOAT, ["n", 64]))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["pixels", "W"], ["z"]), helper.make_node("Add", ["z", "B"], ["scores"])],
        "sklearn-logreg", inputs, [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", 10])],
        [weights, bias])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sources")
    mnist = os.environ.get("MNIST_DIR") or str(ROOT.parent / "shared" / "data" / "mnist")
    made = subprocess.run([PYTHON, "-c", MAKE_SOURCES, str(out), mnist], cwd=ROOT, env=clean_env(),
                          capture_output=True, text=True, timeout=300, check=False)
    assert made.returncode == 0, made.stderr[-3000:]
    onnx_logistic_regression(out / "logreg.onnx")
    onnx_logistic_regression(out / "two-inputs.onnx", two_inputs=True)
    return out


def serving_import(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "serving", "import", *args], cwd=ROOT, env=clean_env(),
                          capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def repo(sources: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("imported")
    for args in ((str(sources / "tfserving" / "mnist" / "1"), "--name", "tutorial-sm", "--export-onnx"),
                 (str(sources / "tutorial.keras"), "--name", "tutorial-keras", "--sample",
                  str(sources / "seven.npy"), "--sample-label", "7"),
                 (str(sources / "net.pt"), "--name", "torch-net", "--input-shape", "28,28", "--export-onnx"),
                 (str(sources / "logreg.onnx"), "--name", "sklearn-onnx", "--input-range", "0,1",
                  "--input", "image")):
        result = serving_import(*args, "--repository", str(root))
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.startswith(f"imported {args[2]} version 1 into ")
    return root


def test_metadata_records_every_file_and_the_signature(repo: Path) -> None:
    meta = orjson.loads((repo / "tutorial-sm" / "1" / "metadata.json").read_bytes())
    files = {p.relative_to(repo / "tutorial-sm" / "1").as_posix() for p in (repo / "tutorial-sm" / "1").rglob("*")
             if p.is_file() and p.name != "metadata.json"}
    assert set(meta["artifacts"]) == files and "saved_model.pb" in files and "model.onnx" in files
    assert any(name.startswith("variables/") for name in files)
    assert (meta["backend"], meta["input"]["layout"], meta["input"]["shape"]) == ("savedmodel", "NHW", [28, 28])
    assert meta["output"]["activation"] == "softmax" and meta["onnx_max_abs_diff"] < 1e-4
    onnx_meta = orjson.loads((repo / "sklearn-onnx" / "1" / "metadata.json").read_bytes())
    assert (onnx_meta["input"]["name"], onnx_meta["input"]["layout"], onnx_meta["output"]["activation"]) \
        == ("pixels", "flat", "logits")
    torch_meta = orjson.loads((repo / "torch-net" / "1" / "metadata.json").read_bytes())
    assert torch_meta["input"]["layout"] == "NCHW" and torch_meta["output"]["activation"] == "logits"


@pytest.mark.parametrize(("model", "platform", "side"), [
    ("tutorial-sm", "tensorflow_savedmodel", 28), ("tutorial-keras", "tensorflow_keras", 28),
    ("torch-net", "pytorch_torchscript", 28), ("sklearn-onnx", "onnxruntime_onnx", 8),
])
def test_each_imported_format_answers_every_api(repo: Path, tmp_path: Path, model: str, platform: str,
                                                side: int) -> None:
    pixels = np.zeros((side, side), dtype=np.uint8)
    pixels[side // 4: side - side // 4, side // 2 - 1: side // 2 + 1] = 255  # a stroke: a "1"
    png = io.BytesIO()
    Image.fromarray(pixels).resize((side * 4, side * 4)).save(png, format="PNG")
    with GunicornServer(repo, tmp_path, model=model, workers=1) as server:
        meta = requests.get(f"{server.url}/v2/models/{model}", timeout=10).json()
        assert meta["platform"] == platform and meta["inputs"][0]["shape"][-2:] in ([side, side], [1, side * side])
        native = requests.post(server.url + "/predict", json={"data": (pixels / 255).tolist()}, timeout=10)
        assert native.status_code == 200 and np.isclose(sum(native.json()["prediction"][0]), 1.0, atol=1e-4)
        label = str(int(np.argmax(native.json()["prediction"][0])))
        classic = requests.post(server.url + "/inference", json={"images": pixels.tolist()}, timeout=10)
        assert classic.status_code == 200 and classic.text == label
        body = orjson.dumps({"inputs": [{"name": meta["inputs"][0]["name"], "shape": [1, side, side],
                                         "datatype": "UINT8", "data": pixels.reshape(-1).tolist()}]})
        v2 = requests.post(f"{server.url}/v2/models/{model}/infer", data=body, timeout=10)
        assert v2.status_code == 200, v2.text
        outputs = {o["name"]: o for o in v2.json()["outputs"]}
        assert outputs["label"]["data"] == [label]
        upload = requests.post(server.url + "/predict/label", data=png.getvalue(),
                               headers={"Content-Type": "image/png"}, timeout=10)
        assert upload.status_code == 200 and len(upload.json()["prediction"]) == 1
        smoke = requests.get(server.url + "/predict/test/label", timeout=10).json()
        if model == "tutorial-keras":  # imported with --sample seven.npy --sample-label 7: a real check
            assert smoke["expected"] == "7" and smoke["correct"] is (smoke["prediction"] == "7"), smoke
        else:  # no labelled sample: the answer says so instead of claiming it is right
            assert (smoke["expected"], smoke["correct"]) == (None, None) and "--sample" in smoke["note"], smoke


@pytest.mark.parametrize(("source", "extra", "message"), [
    ("missing.onnx", (), "no such file or folder"),
    ("notes.txt", (), "unknown format '.txt'"),
    ("two-inputs.onnx", (), "has 2 inputs"),
    ("tutorial.keras", ("--labels", "a,b"), "returns 10 scores per sample but there are 2 labels"),
    ("pickled.pt", ("--input-shape", "28,28"), "a pickled PyTorch model, not TorchScript"),
    ("net.pt", (), "pass --input-shape H,W"),
    ("lambda.keras", (), "needs safe_mode=False"),
    ("tutorial.keras", ("--input-shape", "8,8"), "disagrees with the model's own 28x28"),
    ("tfserving", (), "folder without saved_model.pb"),
])
def test_every_refusal_is_one_line_and_exit_2(sources: Path, tmp_path: Path, source: str, extra: tuple[str, ...],
                                             message: str) -> None:
    (sources / "notes.txt").write_text("not a model")
    result = serving_import(str(sources / source), "--name", "x", "--repository", str(tmp_path), *extra)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and message in errors[0], result.stderr[-1500:]
    assert "Traceback" not in result.stderr and not list(tmp_path.glob("x/*"))  # nothing half-written


def test_a_file_tampered_after_import_is_refused(repo: Path, tmp_path: Path) -> None:
    copy = tmp_path / "models"
    shutil.copytree(repo, copy)
    (copy / "tutorial-sm" / "1" / "variables" / "variables.index").write_bytes(b"tampered")
    settings = Settings.from_env({}, model_repository=copy, model="tutorial-sm")
    with pytest.raises(ModelLoadError, match=r"variables.index of \S+ was modified after training"):
        InferenceService(settings).resolve()


@pytest.fixture(scope="module")
def tfserving(sources: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TF Serving base path with mnist/1 (the tutorial's folder) and mnist/2 (a copy), no metadata.json."""
    base = tmp_path_factory.mktemp("tfserving")
    shutil.copytree(sources / "tfserving" / "mnist" / "1", base / "mnist" / "1")
    shutil.copytree(sources / "tfserving" / "mnist" / "1", base / "mnist" / "2")
    return base


def test_a_tf_serving_folder_is_served_as_it_is(tfserving: Path, tmp_path: Path) -> None:
    seven = np.zeros((28, 28), dtype=np.uint8)
    seven[6:8, 8:21] = 255
    for row in range(8, 24):
        seven[row, 20 - (row - 8) // 2: 22 - (row - 8) // 2] = 255
    with GunicornServer(tfserving, tmp_path, workers=1) as server:
        classic = requests.post(server.url + "/inference", json={"images": seven.tolist()}, timeout=10)
        assert classic.status_code == 200 and classic.text.isdigit()  # the classic client, no import step
        assert requests.get(server.url + "/metadata", timeout=10).json()["version"] == 2  # the latest
        meta = requests.get(server.url + "/v2/models/mnist", timeout=10).json()
        assert meta["platform"] == "tensorflow_savedmodel" and meta["inputs"][0]["name"] == "inputs"
        log = server.log()
        assert "mnist:2 is a TF Serving folder without metadata.json: no digest is checked" in log
        assert f"serving import {tfserving / 'mnist' / '2'} --name mnist" in log
    with GunicornServer(tfserving, tmp_path, workers=1, model_version=1) as pinned:
        assert requests.get(pinned.url + "/metadata", timeout=10).json()["version"] == 1


def test_tf_serving_signature_read_without_tensorflow_matches_tensorflow(tfserving: Path) -> None:
    """The master reads the signature from the protobuf's wire format; TensorFlow itself must agree."""
    from serving.store.tfserving import read_signature

    code = ("import sys, json, tensorflow as tf; s = tf.saved_model.load(sys.argv[1]).signatures['serving_default'];"
            "print(json.dumps({'inputs': {k: [v.dtype.name, [-1 if d is None else d for d in v.shape]]"
            " for k, v in s.structured_input_signature[1].items()}, 'outputs': {k: [v.dtype.name,"
            " [-1 if d is None else d for d in v.shape]] for k, v in s.structured_outputs.items()}}))")
    result = subprocess.run([PYTHON, "-c", code, str(tfserving / "mnist" / "1")], env=clean_env(),
                            capture_output=True, text=True, timeout=120, check=True)
    expected = orjson.loads(result.stdout.strip().splitlines()[-1])
    ours = read_signature(tfserving / "mnist" / "1")
    assert {side: {k: [d, s] for k, (d, s) in v.items()} for side, v in ours.items()} == expected
    master_like = subprocess.run(  # what the gunicorn master does: resolve, and never import a framework
        [PYTHON, "-c", "import sys; from serving.store.repository import ModelRepository;"
         f" ModelRepository({str(tfserving)!r}).resolve('mnist'); assert 'tensorflow' not in sys.modules"],
        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=60, check=False)
    assert master_like.returncode == 0, master_like.stderr[-1500:]


def test_reference_statistics_are_recorded_from_representative_inputs(sources: Path, tmp_path: Path) -> None:
    """``--reference FILE.npy``: drift's reference (the inputs' bands and the model's predicted classes) goes
    into metadata.json; a file of the wrong shape is refused in one line."""
    from sklearn.datasets import load_digits

    inputs = tmp_path / "digits.npy"
    np.save(inputs, (load_digits().data / 16.0).reshape(-1, 8, 8).astype(np.float32))
    result = serving_import(str(sources / "logreg.onnx"), "--name", "drifty", "--input-range", "0,1",
                            "--reference", str(inputs), "--repository", str(tmp_path / "repo"))
    assert result.returncode == 0, result.stderr[-2000:]
    reference = orjson.loads((tmp_path / "repo" / "drifty" / "1" / "metadata.json").read_bytes())["reference"]
    assert reference["samples"] == 1797 and len(reference["inputs"]) == 17
    predicted = reference["class_prior"]["counts"]
    assert sum(predicted) == 1797 and min(predicted) > 100  # a working classifier predicts every digit
    np.save(tmp_path / "flat.npy", np.zeros((200, 10), dtype=np.float32))
    refused = serving_import(str(sources / "logreg.onnx"), "--name", "x", "--reference", str(tmp_path / "flat.npy"),
                             "--repository", str(tmp_path / "other"))
    assert refused.returncode == 2 and "--reference" in refused.stderr and "expected [N, 8, 8]" in refused.stderr
