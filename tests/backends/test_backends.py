"""Each backend loaded in-process on models trained by the session fixture."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from serving.backends import REGISTRY, backend_class
from serving.config import Settings
from serving.errors import ConfigError, InvalidInput, ModelLoadError, ModelNotFound
from serving.protocol.native import metadata_document
from serving.runtime.service import InferenceService
from serving.store.repository import ModelRepository
from serving.toolchain.data import load_digits_dataset

CASES = [("digits-tf", "tensorflow"), ("digits-tf", "onnx"), ("digits-torch", "pytorch"), ("digits-torch", "onnx")]


@pytest.fixture(scope="module")
def digits():  # type: ignore[no-untyped-def]
    return load_digits_dataset(seed=0)


@pytest.mark.parametrize(("model", "backend"), CASES)
def test_backend_predicts_probabilities_accurately(model_repo: Path, digits, model: str, backend: str) -> None:  # type: ignore[no-untyped-def]
    meta = ModelRepository(model_repo).resolve(model)
    runner = backend_class(backend)(meta, math_threads=1)
    runner.load()
    probabilities = runner.predict(digits.x_test)
    assert probabilities.shape == (len(digits.x_test), 10) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
    accuracy = float(np.mean(probabilities.argmax(axis=1) == digits.y_test))
    assert accuracy >= 0.95
    assert accuracy == pytest.approx(meta.raw["test_accuracy"], abs=1e-3)
    one = runner.predict(digits.x_test[:1])
    np.testing.assert_allclose(one, probabilities[:1], atol=1e-5)  # batch size does not change answers
    assert runner.framework_version()


def test_onnx_export_agrees_with_the_native_model(model_repo: Path, digits) -> None:  # type: ignore[no-untyped-def]
    for model, native in (("digits-tf", "tensorflow"), ("digits-torch", "pytorch")):
        meta = ModelRepository(model_repo).resolve(model)
        outputs = []
        for name in (native, "onnx"):
            runner = backend_class(name)(meta, math_threads=1)
            runner.load()
            outputs.append(runner.predict(digits.x_test))
        np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-4)


def test_pytorch_threads_are_capped(model_repo: Path) -> None:
    import torch

    meta = ModelRepository(model_repo).resolve("digits-torch")
    backend_class("pytorch")(meta, math_threads=1).load()
    assert torch.get_num_threads() == 1


def test_backends_describe_themselves() -> None:
    """Name, artifact, thread safety, v2 platform and native framework live on the class, nowhere else."""
    facts = {name: (cls.name, cls.artifact, cls.thread_safe, cls.platform, cls.framework)
             for name, cls in ((name, backend_class(name)) for name in REGISTRY)}
    assert facts == {
        "tensorflow": ("tensorflow", "model.keras", True, "tensorflow_keras", "tensorflow"),
        "pytorch": ("pytorch", "model.pt", False, "pytorch_torchscript", "pytorch"),
        "onnx": ("onnx", "model.onnx", True, "onnxruntime_onnx", ""),
        "savedmodel": ("savedmodel", "saved_model.pb", True, "tensorflow_savedmodel", "tensorflow"),
    }


def test_an_unknown_backend_is_refused_by_the_registry_naming_the_known_ones(model_repo: Path) -> None:
    settings = Settings.from_env({"SERVING_BACKEND": "tflite"}, model_repository=model_repo)  # settings accept it
    with pytest.raises(ModelLoadError, match="'tflite' is neither one of tensorflow, pytorch, onnx, savedmodel"):
        InferenceService(settings).resolve()


def service(repo: Path, **overrides: object) -> InferenceService:
    return InferenceService(Settings.from_env({}, model_repository=repo, **overrides))


def test_service_resolution_rules(model_repo: Path, repo_copy: Path, tmp_path: Path) -> None:
    assert service(model_repo).resolve().name == "digits-tf"  # the default when present
    assert service(model_repo, model="digits-torch").resolve().framework == "pytorch"
    with pytest.raises(ModelLoadError, match="no model in"):
        service(tmp_path / "nothing").resolve()
    with pytest.raises(ModelLoadError, match="invalid model name"):
        service(model_repo, model="../digits-tf").resolve()
    with pytest.raises(ModelLoadError, match="has no version 9"):
        service(model_repo, model="digits-tf", model_version=9).resolve()
    with pytest.raises(ModelLoadError, match="trained with tensorflow"):
        service(model_repo, model="digits-tf", backend="pytorch").resolve()
    with pytest.raises(ConfigError, match="process-only"):
        service(model_repo, model="digits-torch", mode="threaded").resolve()
    import shutil

    shutil.rmtree(repo_copy / "digits-tf")
    assert service(repo_copy).resolve().name == "digits-torch"  # the only model left
    with pytest.raises(ModelNotFound):
        ModelRepository(repo_copy).resolve("..")


def test_service_predict_and_labels(model_repo: Path, digits) -> None:  # type: ignore[no-untyped-def]
    svc = service(model_repo, backend="onnx")
    assert not svc.ready
    probabilities = svc.predict(digits.x_test[:5])
    assert svc.ready and svc.labels_for(probabilities) == [str(i) for i in probabilities.argmax(axis=1)]
    document = metadata_document(svc)
    assert document["input"]["shape"] == [8, 8] and document["labels"][0] == "0"
    assert not isinstance(InvalidInput("x"), ModelLoadError)


def test_tampered_artifact_refused_by_checksum(repo_copy: Path) -> None:
    target = repo_copy / "digits-torch" / "1" / "model.pt"
    target.write_bytes(target.read_bytes()[:-10])
    with pytest.raises(ModelLoadError, match="modified after training"):
        service(repo_copy, model="digits-torch").resolve()
