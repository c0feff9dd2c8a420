"""Each tutorial this project grew from, run as written against a fresh model repository (docs/coming-from-*.md).

- The classic Flask MNIST tutorial: ``python train.py`` (conftest's ``mnist_repo`` runs exactly that), then
  ``gunicorn flask_server:app -w 4``, ``python flask_server.py`` and the daemon line
  ``gunicorn flask_server:application --bind=... --daemon -w 4``, each answering the tutorial's own client
  (``{"images": 28x28 0-255}`` to ``/inference``). The only change to its commands is the port: tests bind a
  free one.
- The web single pattern with ONNX Runtime: a scikit-learn SVM on iris exported with skl2onnx (the tutorial's
  ``iris_svc.onnx``, ZipMap output and all), imported with its ``label.json``, or trained by
  ``python train.py --dataset iris``; its requests answer what scikit-learn computes, to 1e-5.

Real gunicorn on loopback, real HTTP; nothing is downloaded (MNIST comes from MNIST_DIR, iris with scikit-learn).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import requests

from serving.http.local_names import machine_names
from serving.toolchain.data import load_mnist
from tests.conftest import GUNICORN, PYTHON, ROOT, GunicornServer, clean_env, free_port, iris_svm
from tests.mnist_support import mnist_dir

pytestmark = pytest.mark.slow
SETOSA = [[5.1, 3.5, 1.4, 0.2]]  # the tutorial's Data() default
TUTORIAL_ROWS = [[1.0, 2.0, 3.0, 4.0]]  # its README's POST /predict


def probabilities(model: Any, rows: list[list[float]]) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # SVC(probability=True): deprecated in scikit-learn 1.9
        return np.asarray(model.predict_proba(np.asarray(rows, dtype=np.float32)))


# -- the classic Flask MNIST tutorial --------------------------------------------------------------------
@pytest.fixture(scope="module")
def t10k() -> tuple[np.ndarray, np.ndarray]:
    data = load_mnist(mnist_dir())
    return np.rint(data.x_test[:200] * 255).astype(np.uint8), data.y_test[:200]


def classic_client(url: str, images: np.ndarray) -> list[str]:
    """The tutorial's client: one image of 0-255 pixels per request, the body printed as the answer."""
    with requests.Session() as session:
        return [session.post(url + "/inference", json={"images": image.tolist()}, timeout=10).text
                for image in images]


def test_python_train_py_then_gunicorn_w_4_answers_the_classic_client(mnist_repo: Path, tmp_path: Path,
                                                                        t10k: tuple) -> None:
    images, labels = t10k
    server = GunicornServer(mnist_repo, tmp_path, ("-w", "4"))
    server.command = [GUNICORN, "flask_server:app", "-w", "4", "-b", f"127.0.0.1:{server.port}"]
    with server:
        answers = classic_client(server.url, images)
        right = sum(answer == str(label) for answer, label in zip(answers, labels, strict=True))
        assert right >= 198, f"{right} of the first 200 t10k digits"  # the default model: >= 0.99 on all 10,000
        assert "serving mnist-torch version 1" in server.log()


def test_python_flask_server_py_serves_the_default_model(mnist_repo: Path, tmp_path: Path, t10k: tuple) -> None:
    server = GunicornServer(mnist_repo, tmp_path, workers=1)
    server.command = [PYTHON, "flask_server.py", "--port", str(server.port)]
    with server:
        assert classic_client(server.url, t10k[0][:1]) == ["7"]


def test_the_daemon_line_as_written(mnist_repo: Path, tmp_path: Path, t10k: tuple) -> None:
    """``gunicorn flask_server:application --bind=0.0.0.0:PORT --daemon -w 4``: it says it started, serves other
    machines' requests (Host: one of this machine's names), and its failures come back to the terminal."""
    port = free_port()
    pid_file, log_file = tmp_path / "server.pid", tmp_path / "server.log"
    env = clean_env(SERVING_MODEL_REPOSITORY=str(mnist_repo), SERVING_LOG_FILE=str(log_file))
    daemon = [GUNICORN, "flask_server:application", f"--bind=0.0.0.0:{port}", "--daemon", "-w", "4",
              "--pid", str(pid_file)]
    started = subprocess.run(daemon, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    pid = int(pid_file.read_text()) if pid_file.exists() else 0
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert started.stdout.startswith(f"started in the background: gunicorn master pid {pid}; log: {log_file}")
        assert classic_client(f"http://127.0.0.1:{port}", t10k[0][:1]) == ["7"]  # ready when the command returns
        address = next(name for name in sorted(machine_names()) if name not in ("127.0.0.1", "::1")
                       and ":" not in name)
        from_outside = requests.get(f"http://127.0.0.1:{port}/predict/test/label",
                                    headers={"Host": f"{address}:{port}"}, timeout=10)
        assert from_outside.status_code == 200 and from_outside.json()["correct"] is True, from_outside.text
        assert requests.get(f"http://127.0.0.1:{port}/label", headers={"Host": "evil.example"},
                            timeout=10).status_code == 421
        log = log_file.read_text()
        assert "SERVING_ALLOWED_HOSTS" in log and address in log  # the start says which Host names it answers
        again = subprocess.run(daemon, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
        assert again.returncode == 1 and "Already running" in again.stderr, again.stderr  # on the terminal
    finally:
        if pid and psutil.pid_exists(pid):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while psutil.pid_exists(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
    missing = subprocess.run([GUNICORN, "flask_server:nope", f"--bind=127.0.0.1:{free_port()}", "--daemon",
                              "--pid", str(tmp_path / "other.pid")], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=120, check=False)
    assert missing.returncode == 1, missing.stdout + missing.stderr
    assert "error: the server stopped while starting" in missing.stderr
    assert "Failed to find attribute 'nope' in 'flask_server'" in missing.stderr


# -- the web single pattern with ONNX Runtime (iris, scikit-learn, skl2onnx) --------------------------------
MAKE_TUTORIAL_MODEL = r'''
import json, sys, warnings
warnings.simplefilter("ignore", FutureWarning)
from sklearn.datasets import load_iris
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
out = sys.argv[1]
x, y = load_iris(return_X_y=True)
model = Pipeline([("normalize", StandardScaler()), ("svc", SVC(probability=True))]).fit(x, y)
onx = convert_sklearn(model, initial_types=[("float_input", FloatTensorType([None, 4]))])
open(f"{out}/iris_svc.onnx", "wb").write(onx.SerializeToString())
json.dump({"0": "setosa", "1": "versicolor", "2": "virginica"}, open(f"{out}/label.json", "w"))
rows = [[5.1, 3.5, 1.4, 0.2], [1.0, 2.0, 3.0, 4.0], [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5]]
json.dump({"rows": rows, "probabilities": model.predict_proba(rows).tolist()}, open(f"{out}/expected.json", "w"))
'''


@pytest.fixture(scope="module")
def tutorial(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tutorial's files, made as its training step makes them: iris_svc.onnx (skl2onnx's default ZipMap
    output, integer classes) and label.json; plus what scikit-learn itself computes for a few rows."""
    out = tmp_path_factory.mktemp("tutorial")
    made = subprocess.run([PYTHON, "-c", MAKE_TUTORIAL_MODEL, str(out)], env=clean_env(), capture_output=True,
                          text=True, timeout=120, check=False)
    assert made.returncode == 0, made.stderr
    (out / "sample.json").write_text(json.dumps({"data": SETOSA[0], "label": "setosa"}))
    return out


@pytest.fixture(scope="module")
def iris_server(tutorial: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GunicornServer]:
    repo = tmp_path_factory.mktemp("fresh") / "models"
    imported = subprocess.run(
        [PYTHON, "-m", "serving", "import", str(tutorial / "iris_svc.onnx"), "--name", "iris", "--repository",
         str(repo), "--labels-file", str(tutorial / "label.json"), "--sample", str(tutorial / "sample.json")],
        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=120, check=False)
    assert imported.returncode == 0, imported.stderr
    assert "input 4 features float32 (any finite values), 3 labels (setosa, versicolor, virginica)" in imported.stdout
    server = GunicornServer(repo, tmp_path_factory.mktemp("iris-log"), workers=2)
    server.command = [GUNICORN, "flask_server:app", "-b", f"127.0.0.1:{server.port}"]
    with server:
        yield server


def test_the_tutorials_requests_answer_what_scikit_learn_computes(iris_server: GunicornServer,
                                                                   tutorial: Path) -> None:
    expected = json.loads((tutorial / "expected.json").read_text())
    url = iris_server.url
    assert requests.get(url + "/health", timeout=10).json()["status"] == "ok"
    for rows, probs in ((SETOSA, expected["probabilities"][:1]), (TUTORIAL_ROWS, expected["probabilities"][1:2])):
        answer = requests.post(url + "/predict", json={"data": rows}, timeout=10)  # curl -d '{"data": [[...]]}'
        assert answer.status_code == 200, answer.text
        np.testing.assert_allclose(answer.json()["prediction"], probs, atol=1e-5)
    batch = requests.post(url + "/predict", json={"data": expected["rows"]}, timeout=10).json()["prediction"]
    np.testing.assert_allclose(batch, expected["probabilities"], atol=1e-5)
    labels = requests.post(url + "/predict/label", json={"data": expected["rows"]}, timeout=10).json()
    names = ["setosa", "versicolor", "virginica"]
    assert labels["prediction"] == [names[i] for i in np.argmax(expected["probabilities"], axis=1)]
    assert labels["prediction"][0] == "setosa"
    assert requests.get(url + "/label", timeout=10).json() == {"labels": names}
    test = requests.get(url + "/predict/test", timeout=10).json()
    np.testing.assert_allclose(test["prediction"], expected["probabilities"][0], atol=1e-5)
    assert requests.get(url + "/predict/test/label", timeout=10).json() == {
        "prediction": "setosa", "expected": "setosa", "correct": True}
    meta = requests.get(url + "/metadata", timeout=10).json()
    assert meta["input"]["kind"] == "features" and meta["input"]["shape"] == [4] and meta["labels"] == names
    v2 = requests.post(url + "/v2/models/iris/infer", json={"inputs": [
        {"name": "float_input", "shape": [1, 4], "datatype": "FP32", "data": SETOSA[0]}]}, timeout=10).json()
    np.testing.assert_allclose(v2["outputs"][0]["data"], expected["probabilities"][0], atol=1e-5)


def test_python_train_py_dataset_iris_serves_the_same_requests(iris_repo: Path, tmp_path: Path) -> None:
    svm = iris_svm()
    with GunicornServer(iris_repo, tmp_path, workers=1) as server:  # iris-svc: the only model there
        rows = SETOSA + TUTORIAL_ROWS
        answer = requests.post(server.url + "/predict", json={"data": rows}, timeout=10)
        np.testing.assert_allclose(answer.json()["prediction"], probabilities(svm, rows), atol=1e-5)
        assert requests.post(server.url + "/predict/label", json={"data": SETOSA}, timeout=10).json()[
            "prediction"] == ["setosa"]
        assert requests.get(server.url + "/predict/test/label", timeout=10).json()["correct"] is True
        names = [f["name"] for f in requests.get(server.url + "/metadata", timeout=10).json()["input"]["features"]]
        assert names == ["sepal length (cm)", "sepal width (cm)", "petal length (cm)", "petal width (cm)"]


def test_an_import_without_a_sample_says_its_label_is_unknown(tutorial: Path, tmp_path: Path) -> None:
    repo = tmp_path / "models"
    imported = subprocess.run(
        [sys.executable, "-m", "serving", "import", str(tutorial / "iris_svc.onnx"), "--name", "iris",
         "--repository", str(repo), "--labels", "setosa,versicolor,virginica",
         "--feature-names", "sepal length,sepal width,petal length,petal width"],
        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=120, check=False)
    assert imported.returncode == 0, imported.stderr
    assert "no labelled sample (--sample FILE --sample-label L records one)" in imported.stdout
    with GunicornServer(repo, tmp_path, workers=1) as server:
        smoke = requests.get(server.url + "/predict/test/label", timeout=10).json()
        assert smoke["expected"] is None and smoke["correct"] is None and "--sample-label" in smoke["note"]
        features = requests.get(server.url + "/metadata", timeout=10).json()["input"]["features"]
        assert [f["name"] for f in features] == ["sepal length", "sepal width", "petal length", "petal width"]
