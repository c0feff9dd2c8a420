"""train.py end to end: the real CLI in a subprocess, then the artifacts it published, loaded for real.

The default run (both frameworks, default epochs) is conftest's session-scoped ``model_repo``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from serving.store.repository import ModelRepository, sha256_file
from serving.toolchain.data import MNIST_FILES, load_digits_dataset, write_idx
from serving.toolchain.export import ExportError, check_onnx
from serving.toolchain.training import learning_rate, model_name
from tests.conftest import ROOT, clean_env, train
from tests.mnist_support import mnist_dir, run_train

NAMES = {"digits-tf": "tensorflow", "digits-torch": "pytorch"}
NATIVE = {"tensorflow": "model.keras", "pytorch": "model.pt"}

pytestmark = pytest.mark.slow


def onnx_probabilities(path: Path, inputs: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (probabilities,) = session.run(["probabilities"], {"input": inputs.astype(np.float32)})
    return np.asarray(probabilities)


def native_probabilities(framework: str, path: Path, images: np.ndarray) -> np.ndarray:
    """Load the native artifact the way a server would and run it on (N, H, W) images."""
    if framework == "tensorflow":
        import keras

        model = keras.models.load_model(path)
        return np.asarray(model.predict_on_batch(images[..., None]))
    import torch

    module = torch.jit.load(str(path))
    with torch.inference_mode():
        return module(torch.from_numpy(images[:, None])).numpy()


def layout(framework: str, images: np.ndarray) -> np.ndarray:
    return images[..., None] if framework == "tensorflow" else images[:, None]


def check_version(root: Path, name: str, version: int, framework: str, arch: str = "small") -> dict[str, Any]:
    """Layout, metadata shape and sha256 of one published version; returns its metadata."""
    path = root / name / str(version)
    native = NATIVE[framework]
    assert sorted(p.name for p in path.iterdir()) == sorted(
        [native, "model.onnx", "labels.json", "sample.json", "metadata.json"]
    )
    meta = orjson.loads((path / "metadata.json").read_bytes())
    assert (meta["name"], meta["version"], meta["framework"], meta["arch"]) == (name, version, framework, arch)
    layout_name = "NHWC" if framework == "tensorflow" else "NCHW"
    assert meta["input"]["name"] == "input" and meta["input"]["dtype"] == "float32"
    assert meta["input"]["range"] == [0.0, 1.0] and meta["input"]["layout"] == layout_name
    assert meta["output"] == {"name": "probabilities", "shape": [10], "dtype": "float32"}
    assert meta["labels"] == [str(i) for i in range(10)]
    assert orjson.loads((path / "labels.json").read_bytes()) == meta["labels"]
    assert meta["seed"] == 0 and meta["epochs"] >= 1 and meta["created"].endswith("Z")
    assert 0 <= meta["onnx_max_abs_diff"] < 1e-4
    assert {"onnx", "onnxruntime"} <= set(meta["versions"])
    assert set(meta["artifacts"]) == {native, "model.onnx", "labels.json", "sample.json"}
    for filename, info in meta["artifacts"].items():
        assert info["sha256"] == sha256_file(path / filename), filename
    resolved = ModelRepository(root).resolve(name, version)
    for filename in meta["artifacts"]:
        resolved.verify(filename)
    # no staging directory is left behind next to the versions
    assert all(p.name.isdigit() for p in (root / name).iterdir())
    return meta


@pytest.mark.parametrize("name", sorted(NAMES))
def test_default_run_publishes_version_1(model_repo: Path, name: str) -> None:
    meta = check_version(model_repo, name, 1, NAMES[name])
    assert meta["dataset"] == "digits" and meta["input"]["shape"] == [8, 8]
    assert meta["test_samples"] == 360
    assert meta["test_accuracy"] >= 0.95


@pytest.mark.parametrize("name", sorted(NAMES))
def test_onnx_matches_native_and_accuracy(model_repo: Path, name: str) -> None:
    framework = NAMES[name]
    path = model_repo / name / "1"
    dataset = load_digits_dataset(seed=0)
    native = native_probabilities(framework, path / NATIVE[framework], dataset.x_test)
    exported = onnx_probabilities(path / "model.onnx", layout(framework, dataset.x_test))
    assert native.shape == exported.shape == (360, 10)
    np.testing.assert_allclose(native.sum(axis=1), 1.0, atol=1e-5)  # probabilities, not logits
    assert float(np.max(np.abs(native - exported))) < 1e-4
    accuracy = float(np.mean(native.argmax(axis=1) == dataset.y_test))
    meta = orjson.loads((path / "metadata.json").read_bytes())
    assert accuracy == pytest.approx(meta["test_accuracy"], abs=1e-6)
    assert accuracy >= 0.95
    # batch dimension is dynamic: one sample and an odd batch both work
    assert onnx_probabilities(path / "model.onnx", layout(framework, dataset.x_test[:1])).shape == (1, 10)
    assert onnx_probabilities(path / "model.onnx", layout(framework, dataset.x_test[:7])).shape == (7, 10)


@pytest.mark.parametrize("name", sorted(NAMES))
def test_sample_is_classified_correctly(model_repo: Path, name: str) -> None:
    framework = NAMES[name]
    data, label = ModelRepository(model_repo).resolve(name, 1).sample()
    image = np.asarray(data, dtype=np.float32)
    assert image.shape == (8, 8) and 0.0 <= image.min() and image.max() <= 1.0
    probabilities = onnx_probabilities(model_repo / name / "1" / "model.onnx", layout(framework, image[None]))
    assert str(int(probabilities.argmax())) == label


def test_second_run_adds_next_version(model_repo: Path, tmp_path: Path) -> None:
    root = tmp_path / "models"
    shutil.copytree(model_repo, root)
    result = train(root, "--dataset", "digits", "--framework", "pytorch", "--epochs", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "epoch   1/1" in result.stdout and "held-out accuracy" in result.stdout
    assert str(root / "digits-torch" / "2") in result.stdout
    check_version(root, "digits-torch", 2, "pytorch")
    assert sorted(p.name for p in (root / "digits-tf").iterdir()) == ["1"]
    assert ModelRepository(root).resolve("digits-torch").version == 2


def test_missing_mnist_exits_2_naming_the_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_train(tmp_path, "--dataset", "mnist", "--data-dir", str(empty), "--no-download")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: MNIST not found in {empty}, ")
    assert "train-images-idx3-ubyte[.gz]" in lines[0] and str(tmp_path / "xdg") in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "models").exists()


def test_invalid_name_exits_2(tmp_path: Path) -> None:
    result = train(tmp_path / "models", "--dataset", "digits", "--framework", "pytorch", "--name", "../escape")
    assert result.returncode == 2 and result.stderr.startswith("error: invalid model name")


def test_mnist_idx_run_with_custom_name(tmp_path: Path) -> None:
    """28x28 data through the whole pipeline: digits upscaled into MNIST-style gzipped IDX files."""
    digits = load_digits_dataset(seed=0)
    data_dir = tmp_path / "mnist"
    data_dir.mkdir()
    for split, x, y in (("train", digits.x_train[:400], digits.y_train[:400]), ("test", digits.x_test, digits.y_test)):
        big = np.pad(np.kron(x, np.ones((3, 3), dtype=np.float32)), ((0, 0), (2, 2), (2, 2)))
        write_idx(data_dir / f"{MNIST_FILES['x_' + split]}.gz", np.round(big * 255).astype(np.uint8))
        write_idx(data_dir / f"{MNIST_FILES['y_' + split]}.gz", y.astype(np.uint8))
    root = tmp_path / "models"
    result = train(root, "--dataset", "mnist", "--data-dir", str(data_dir), "--framework", "pytorch",
                   "--epochs", "2", "--name", "tiny-mnist")
    assert result.returncode == 0, result.stdout + result.stderr
    meta = check_version(root, "tiny-mnist", 1, "pytorch", arch="lenet")  # MNIST's default arch
    assert meta["dataset"] == "mnist" and meta["input"]["shape"] == [28, 28]
    data, _ = ModelRepository(root).resolve("tiny-mnist").sample()
    assert np.asarray(data).shape == (28, 28)


def test_real_mnist_slice_both_frameworks(tmp_path: Path) -> None:
    """The MNIST recipe (lenet: batch norm, dropout, one-cycle schedule) through training, export and the ONNX
    check in both frameworks, on a slice of the real data so it takes seconds, not minutes."""
    result = run_train(tmp_path, "--dataset", "mnist", "--framework", "all", "--limit-train", "4000",
                       "--limit-test", "1000", "--epochs", "2", MNIST_DIR=str(mnist_dir()))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"MNIST from {mnist_dir()}" in result.stdout and "4000 train / 1000 test samples" in result.stdout
    for name, framework in (("mnist-tf", "tensorflow"), ("mnist-torch", "pytorch")):
        meta = check_version(tmp_path / "models", name, 1, framework, arch="lenet")
        assert (meta["dataset"], meta["input"]["shape"], meta["schedule"]) == ("mnist", [28, 28], "onecycle")
        assert meta["learning_rate"] == 3e-3 and meta["input"]["kind"] == "image"
        assert (meta["train_samples"], meta["test_samples"], meta["epochs"]) == (4000, 1000, 2)
        assert meta["test_accuracy"] >= 0.85, meta["test_accuracy"]  # 0.922 both when written; chance is 0.1
        data, label = ModelRepository(tmp_path / "models").resolve(name).sample()
        assert np.asarray(data).shape == (28, 28) and label in meta["labels"]


def test_default_names_and_schedules() -> None:
    assert model_name("digits", "tensorflow") == "digits-tf"
    assert model_name("mnist", "pytorch") == "mnist-torch"  # lenet is MNIST's default arch
    assert model_name("mnist", "pytorch", "lenet") == "mnist-torch"
    assert model_name("mnist", "tensorflow", "small") == "mnist-small-tf"
    assert model_name("digits", "pytorch", "large") == "digits-large-torch"
    assert model_name("mnist", "pytorch", base="m", several=True) == "m-torch"
    assert model_name("iris", "sklearn") == "iris-svc"
    assert learning_rate("constant", 900, 1000) == 1e-3
    assert [learning_rate("cosine", step, 100) for step in (0, 50, 100)] == pytest.approx([1e-3, 5e-4, 0.0])
    # one-cycle: a linear warm-up over the first tenth to the peak, then the cosine to 0 over the rest
    assert [learning_rate("onecycle", step, 100, 3e-3) for step in (0, 5, 10, 55, 100)] \
        == pytest.approx([0.0, 1.5e-3, 3e-3, 1.5e-3, 0.0])
    with pytest.raises(ValueError, match="unknown schedule"):
        learning_rate("step", 0, 1)


def test_large_arch_one_epoch(tmp_path: Path) -> None:
    root = tmp_path / "models"
    result = train(root, "--dataset", "digits", "--arch", "large", "--epochs", "1", "--name", "big")
    assert result.returncode == 0, result.stdout + result.stderr
    for name, framework in (("big-tf", "tensorflow"), ("big-torch", "pytorch")):
        meta = check_version(root, name, 1, framework, arch="large")
        assert meta["epochs"] == 1
        x = np.random.default_rng(0).random((3, 8, 8), dtype=np.float32)
        native = native_probabilities(framework, root / name / "1" / NATIVE[framework], x)
        exported = onnx_probabilities(root / name / "1" / "model.onnx", layout(framework, x))
        assert float(np.max(np.abs(native - exported))) < 1e-4


def test_check_onnx_refuses_a_mismatch(model_repo: Path) -> None:
    path = model_repo / "digits-torch" / "1" / "model.onnx"
    images = load_digits_dataset(seed=0).x_test[:, None]
    good = onnx_probabilities(path, images)
    assert check_onnx(path, good, images) == 0.0
    with pytest.raises(ExportError, match="disagrees"):
        check_onnx(path, good + 1e-3, images)


def test_importing_training_code_imports_no_framework() -> None:
    code = (
        "import sys, serving.toolchain.data, serving.toolchain.nets, serving.toolchain.training, train; "
        "loaded = [m for m in ('torch', 'tensorflow', 'keras', 'onnx', 'onnxruntime', 'tf2onnx') if m in sys.modules]; "
        "assert not loaded, loaded"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_help_lists_options() -> None:
    result = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, env=clean_env(), capture_output=True,
                            text=True, check=True)
    for option in ("--framework", "--dataset", "--data-dir", "--epochs", "--arch", "--name", "--out", "--seed",
                   "--batch-size", "--no-download", "--limit-train", "--limit-test"):
        assert option in result.stdout


def test_the_default_run_trains_one_pytorch_net_on_real_mnist(tmp_path: Path) -> None:
    """``python train.py`` with no dataset: real MNIST (here through MNIST_DIR, on a slice to keep it short), one
    PyTorch lenet named mnist-torch, the model a first ``make serve`` serves."""
    result = run_train(tmp_path, "--limit-train", "2000", "--limit-test", "500", "--epochs", "1",
                       MNIST_DIR=str(mnist_dir()))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"MNIST from {mnist_dir()}" in result.stdout and "instead of MNIST" not in result.stdout
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["mnist-torch"]
    meta = check_version(tmp_path / "models", "mnist-torch", 1, "pytorch", arch="lenet")
    assert (meta["dataset"], meta["schedule"], meta["batch_size"]) == ("mnist", "onecycle", 128)


def test_without_mnist_the_default_run_says_why_and_trains_the_digits(tmp_path: Path) -> None:
    """No MNIST anywhere and no mirror that answers: one line says why and how to get MNIST, and the bundled
    8x8 digits are trained instead (both frameworks by default; one here, for time)."""
    result = run_train(tmp_path, "--framework", "pytorch", "--epochs", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    fallback = [line for line in result.stdout.splitlines() if "instead of MNIST" in line]
    assert len(fallback) == 1 and "could not download" in fallback[0], result.stdout
    assert "--data-dir" in fallback[0] and "MNIST_DIR" in fallback[0]
    check_version(tmp_path / "models", "digits-torch", 1, "pytorch")
    # --dataset mnist asked for MNIST: no fallback, one error line
    strict = run_train(tmp_path, "--dataset", "mnist", "--no-download")
    assert strict.returncode == 2 and strict.stderr.startswith("error: MNIST not found")


def test_iris_trains_the_tutorials_svm_through_skl2onnx(tmp_path: Path) -> None:
    result = run_train(tmp_path, "--dataset", "iris")
    assert result.returncode == 0, result.stdout + result.stderr
    path = tmp_path / "models" / "iris-svc" / "1"
    assert sorted(p.name for p in path.iterdir()) == ["labels.json", "metadata.json", "model.onnx", "sample.json"]
    meta = orjson.loads((path / "metadata.json").read_bytes())
    assert (meta["framework"], meta["backend"], meta["arch"], meta["dataset"]) == ("sklearn", "onnx", "svc", "iris")
    assert meta["labels"] == ["setosa", "versicolor", "virginica"] and meta["test_samples"] == 30
    assert meta["input"]["kind"] == "features" and meta["input"]["shape"] == [4] and meta["input"]["range"] is None
    names = [feature["name"] for feature in meta["input"]["features"]]
    assert names == ["sepal length (cm)", "sepal width (cm)", "petal length (cm)", "petal width (cm)"]
    assert meta["input"]["features"][0]["range"] == [4.3, 7.9]  # the training split's, as float32 prints it
    assert meta["onnx_max_abs_diff"] < 1e-5 and meta["test_accuracy"] >= 0.9
    resolved = ModelRepository(tmp_path / "models").resolve("iris-svc")
    resolved.verify("model.onnx")
    data, label = resolved.sample()
    assert len(data) == 4 and label in meta["labels"]
    assert (resolved.input_kind, resolved.input_shape, resolved.bounded) == ("features", (4,), False)


def test_a_dataset_refuses_the_other_kind_of_framework(tmp_path: Path) -> None:
    for args in (("--dataset", "iris", "--framework", "pytorch"), ("--dataset", "digits", "--framework", "sklearn")):
        result = run_train(tmp_path, *args)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert result.stderr.startswith("error: --dataset ") and "Traceback" not in result.stderr
    assert not (tmp_path / "models").exists()
