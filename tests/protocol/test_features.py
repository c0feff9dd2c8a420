"""A model whose input is a feature vector (iris: 4 measurements), in process: every API takes rows of its
features, refuses what only images have (uploads, pixel scales, the classic /inference), and describes the
features it takes."""

from __future__ import annotations

import io
import warnings
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
from serving.errors import InvalidInput, UnsupportedMediaType
from serving.protocol.inputs import batch_from_data, batch_from_image
from serving.store.repository import Feature, ModelMetadata, ModelRepository
from tests.conftest import iris_svm
from tests.protocol.conftest import serve_in_process

NAMES = ["sepal length (cm)", "sepal width (cm)", "petal length (cm)", "petal width (cm)"]
SETOSA = [5.1, 3.5, 1.4, 0.2]
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def app(iris_repo: Path) -> Iterator[Flask]:
    yield from serve_in_process(Settings.from_env({}, model_repository=iris_repo, models="*"))


@pytest.fixture(scope="module")
def svm() -> Any:
    return iris_svm()


def probabilities(model: Any, rows: list[list[float]]) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return np.asarray(model.predict_proba(np.asarray(rows, dtype=np.float32)))


def test_predict_gives_the_probabilities_scikit_learn_computes(client: FlaskClient, svm: Any) -> None:
    rows = [SETOSA, [1.0, 2.0, 3.0, 4.0], [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5]]
    answer = client.post("/predict", json={"data": rows})
    assert answer.status_code == 200, answer.json
    np.testing.assert_allclose(answer.json["prediction"], probabilities(svm, rows), atol=1e-5)
    one = client.post("/predict", json={"data": SETOSA})  # one row, not nested
    np.testing.assert_allclose(one.json["prediction"], probabilities(svm, [SETOSA]), atol=1e-5)
    labels = client.post("/predict/label", json={"data": rows}).json["prediction"]
    assert labels == [["setosa", "versicolor", "virginica"][i] for i in probabilities(svm, rows).argmax(axis=1)]
    assert labels[0] == "setosa" and client.get("/label").json == {"labels": ["setosa", "versicolor", "virginica"]}


def test_metadata_says_features_and_names_them(client: FlaskClient) -> None:
    spec = client.get("/metadata").json["input"]
    assert (spec["kind"], spec["shape"], spec["range"], spec["content_types"]) == (
        "features", [4], None, ["application/json"])
    assert [feature["name"] for feature in spec["features"]] == NAMES
    assert spec["features"][2]["range"] == [1.0, 6.9] and "feature values" in spec["contract"]
    v2 = client.get("/v2/models/iris-svc").json
    assert v2["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
    assert v2["outputs"][0] == {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}
    model = client.get("/models").json["models"][0]
    assert model["input"]["kind"] == "features" and [f["name"] for f in model["input"]["features"]] == NAMES
    assert len(model["input"]["example"]) == 4  # the stored sample: the front page's form starts from it


def test_the_stored_sample_is_a_real_labelled_row(client: FlaskClient, iris_repo: Path) -> None:
    data, label = ModelRepository(iris_repo).resolve("iris-svc").sample()
    smoke = client.get("/predict/test/label").json
    assert smoke == {"prediction": label, "expected": label, "correct": True}
    test = client.get("/predict/test").json
    assert len(test["prediction"]) == 3 and np.isclose(sum(test["prediction"]), 1.0, atol=1e-5)
    assert test["expected"] == label and test["correct"] is True


@pytest.mark.parametrize(("body", "status", "message"), [
    ({"data": [5.1, 3.5, 1.4]}, 422, "rows of 4 features (sepal length (cm), sepal width (cm)"),
    ({"data": [[5.1, 3.5, 1.4, 0.2, 9.0]]}, 422, "rows of 4 features"),
    ({"data": [[5.1, 3.5, 1.4, 0.2], [1.0]]}, 422, "rectangular"),
    ({"data": [["a", 1, 2, 3]]}, 422, "only numbers"),
    ({"data": [[5.1, 3.5, 1.4, 0.2]] * 65}, 422, "the limit is 64"),
    ({"data": SETOSA, "pixel_range": [0, 255]}, 422, '"pixel_range" is for image models'),
    ({"data": [1e39, 0, 0, 0]}, 422, "beyond float32"),
])
def test_bad_rows_are_refused_with_what_the_model_takes(client: FlaskClient, body: dict, status: int,
                                                        message: str) -> None:
    answer = client.post("/predict", data=orjson.dumps(body), headers=JSON)
    assert answer.status_code == status and message in answer.json["error"], answer.json


def test_what_only_images_have_is_refused(client: FlaskClient) -> None:
    png = io.BytesIO()
    Image.new("L", (8, 8)).save(png, format="PNG")
    upload = client.post("/predict", data=png.getvalue(), headers={"Content-Type": "image/png"})
    assert upload.status_code == 415 and "takes 4 features" in upload.json["error"], upload.json
    framing = client.post("/models/iris-svc/input", data=png.getvalue(), headers={"Content-Type": "image/png"})
    assert framing.status_code == 415 and "not pictures" in framing.json["error"]
    classic = client.post("/inference", json={"images": [[0] * 4]})
    assert classic.status_code == 422 and "POST /predict" in classic.json["error"]


def test_v2_takes_rows_and_does_not_rescale_integers(client: FlaskClient, svm: Any) -> None:
    def infer(datatype: str, data: list, shape: list[int]) -> Any:
        return client.post("/v2/models/iris-svc/infer", json={"inputs": [
            {"name": "input", "shape": shape, "datatype": datatype, "data": data}]})

    answer = infer("FP32", SETOSA, [1, 4])
    assert answer.status_code == 200, answer.json
    np.testing.assert_allclose(answer.json["outputs"][0]["data"], probabilities(svm, [SETOSA])[0], atol=1e-5)
    assert answer.json["outputs"][1]["data"] == ["setosa"]
    as_integers = infer("UINT8", [6, 3, 5, 2], [1, 4]).json["outputs"][0]["data"]  # the values, not pixels
    np.testing.assert_allclose(as_integers, probabilities(svm, [[6, 3, 5, 2]])[0], atol=1e-5)
    wrong = infer("FP32", SETOSA + [1.0], [1, 5])
    assert wrong.status_code == 400 and "takes [-1, 4]" in wrong.json["error"]


FEATURES = ModelMetadata(name="f", version=1, framework="onnx", path=Path("."), input_name="x", input_shape=(3,),
                         input_dtype="float32", input_range=(-np.inf, np.inf), output_name="p", labels=["a", "b"],
                         raw={}, input_kind="features", features=(Feature("a"), Feature("b"), Feature("c")))


def test_feature_rows_in_the_decoder() -> None:
    assert batch_from_data([1, 2, 3], FEATURES, 4).shape == (1, 3)
    assert batch_from_data([[1, 2, 3], [4, 5, 6]], FEATURES, 4).dtype == np.float32
    assert batch_from_data([[-1e30, 0, 1e30]], FEATURES, 4).shape == (1, 3)  # no range: any finite value
    with pytest.raises(InvalidInput, match=r"rows of 3 features \(a, b, c\)"):
        batch_from_data([[1, 2]], FEATURES, 4)
    with pytest.raises(InvalidInput, match=r"shape \[1, 5\]"):
        batch_from_data([[1, 2, 3, 4, 5]], FEATURES, 4)
    with pytest.raises(InvalidInput, match="empty"):
        batch_from_data([], FEATURES, 4)
    with pytest.raises(UnsupportedMediaType, match="not pictures"):
        batch_from_image(b"\x89PNG", FEATURES, 100)
    bounded = ModelMetadata(**{**FEATURES.__dict__, "input_range": (0.0, 10.0)})
    with pytest.raises(InvalidInput, match=r"must lie in \[0, 10\]"):
        batch_from_data([1, 2, 11], bounded, 4)
