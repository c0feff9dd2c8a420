"""The multi-model repository: SERVING_MODELS selection, the index, and how the service resolves models."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from serving.config import Settings
from serving.errors import ConfigError, ModelLoadError, ModelNotFound
from serving.runtime.service import InferenceService
from serving.store.repository import ModelRepository
from serving.toolchain.data import load_digits_dataset
from tests.v2_support import multi_repo


@pytest.fixture(scope="module")
def repo(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return multi_repo(model_repo, tmp_path_factory.mktemp("multi") / "models")


def service(repo: Path, **overrides: object) -> InferenceService:
    return InferenceService(Settings.from_env({}, model_repository=repo, **overrides))


def test_index_and_selection(repo: Path) -> None:
    repository = ModelRepository(repo)
    assert repository.index() == [("digits-tf", 1), ("digits-torch", 1), ("digits-torch", 2)]
    assert repository.select("*") == repository.index()
    assert repository.select("digits-torch") == [("digits-torch", 2)]  # a bare name is its latest version
    assert repository.select("digits-torch:1, digits-tf") == [("digits-torch", 1), ("digits-tf", 1)]
    assert repository.select("digits-torch:*,digits-torch:2") == [("digits-torch", 1), ("digits-torch", 2)]
    with pytest.raises(ModelNotFound, match="has no version 7"):
        repository.select("digits-torch:7")
    with pytest.raises(ModelNotFound, match="no model 'nope'"):
        repository.select("nope:*")
    with pytest.raises(ModelNotFound, match="invalid model name"):
        repository.select("a..b")


def test_selection_setting_is_validated() -> None:
    assert Settings.from_env({"SERVING_MODELS": "a:1, b:*"}).models == "a:1, b:*"
    for bad in ("a,,b", "a:x", "../x", "*,a", "a:-1"):
        with pytest.raises(ConfigError, match="SERVING_MODELS"):
            Settings.from_env({"SERVING_MODELS": bad})


def test_metadata_must_match_its_directory(model_repo: Path, tmp_path: Path) -> None:
    copy = multi_repo(model_repo, tmp_path / "models")
    meta_path = copy / "digits-torch" / "2" / "metadata.json"
    meta = orjson.loads(meta_path.read_bytes())
    meta["version"] = 1
    meta_path.write_bytes(orjson.dumps(meta))
    with pytest.raises(ModelLoadError, match="must match its directory"):
        ModelRepository(copy).resolve("digits-torch", 2)


def test_service_serves_the_default_plus_the_selection(repo: Path) -> None:
    svc = service(repo, models="*", backend="onnx")
    assert svc.resolve().name == "digits-tf"  # the default model of the native API
    assert list(svc.served) == [("digits-tf", 1), ("digits-torch", 1), ("digits-torch", 2)]
    assert svc.key("digits-torch") == ("digits-torch", 2) and svc.key("digits-torch", 1) == ("digits-torch", 1)
    assert svc.versions("digits-torch") == [1, 2]
    with pytest.raises(ModelNotFound, match="no model 'nope' is served"):
        svc.key("nope")
    with pytest.raises(ModelNotFound, match="no version 3"):
        svc.key("digits-torch", 3)

    only = service(repo, models="digits-torch:1", backend="onnx")
    assert only.resolve().name == "digits-torch"  # no SERVING_MODEL: the first selected model
    assert list(only.served) == [("digits-torch", 1)] and only.key("digits-torch") == ("digits-torch", 1)
    pinned = service(repo, model="digits-tf", models="digits-torch:2", backend="onnx")
    pinned.resolve()
    assert list(pinned.served) == [("digits-tf", 1), ("digits-torch", 2)]
    assert list(service(repo).served) == []  # nothing resolved yet
    default_only = service(repo, model="digits-torch")
    default_only.resolve()
    assert list(default_only.served) == [("digits-torch", 2)]  # no selection: the native model alone


def test_every_selected_model_is_checked_at_resolve(repo: Path) -> None:
    with pytest.raises(ModelLoadError, match="SERVING_MODELS: model 'digits-tf' has no version 4"):
        service(repo, models="digits-tf:4").resolve()
    with pytest.raises(ModelLoadError, match="trained with tensorflow"):  # one backend for all: pytorch can't
        service(repo, model="digits-torch", models="*", backend="pytorch").resolve()
    with pytest.raises(ConfigError, match="process-only"):
        service(repo, model="digits-tf", models="digits-torch", mode="threaded").resolve()
    threaded = service(repo, models="*", mode="threaded", backend="onnx")
    threaded.resolve()
    assert len(threaded.served) == 3  # onnx serves every model with threads


def test_index_states(repo: Path) -> None:
    svc = service(repo, model="digits-torch", models="digits-torch:1", backend="onnx")
    states = {(e["name"], e["version"]): e["state"] for e in svc.index(unserved=True)}
    assert states == {("digits-tf", "1"): "UNAVAILABLE", ("digits-torch", "1"): "LOADING",
                      ("digits-torch", "2"): "LOADING"}
    assert [(e["name"], e["version"]) for e in svc.index()] == [("digits-torch", "1"), ("digits-torch", "2")]
    svc.load(workers=1)
    try:
        states = {(e["name"], e["version"]): e["state"] for e in svc.index()}
        assert states[("digits-torch", "1")] == states[("digits-torch", "2")] == "READY"
        assert svc.ready and svc.model_ready("digits-torch", 1)
        batch = load_digits_dataset(seed=0).x_test[:3]
        first = svc.predict(batch, model=svc.model("digits-torch", 1))
        second = svc.predict(batch, model=svc.model("digits-torch", 2))
        assert (first == second).all()  # version 2 is a copy of version 1
    finally:
        svc.close()


def test_the_default_model_is_the_one_the_docs_name_or_the_error_gives_the_line(tmp_path: Path) -> None:
    """SERVING_MODEL empty: mnist-torch (what python train.py trains), then mnist-tf, then digits-tf; several
    other models: the refusal says the exact line to start with."""
    from serving.runtime.versions import Planner

    root = tmp_path / "models"
    for name in ("beta", "alpha"):
        (root / name / "1").mkdir(parents=True)
    planner = Planner(Settings.from_env({}, model_repository=root), ModelRepository(root))
    with pytest.raises(ModelLoadError, match=r"several models \(alpha, beta\).*SERVING_MODEL=alpha gunicorn "
                                             r"flask_server:app"):
        planner.default_name()
    for name in ("digits-tf", "mnist-tf", "mnist-torch"):
        (root / name / "1").mkdir(parents=True)
        assert planner.default_name() == name
    assert Planner(Settings.from_env({}, model_repository=root, model="beta"), ModelRepository(root)).default_name() \
        == "beta"
