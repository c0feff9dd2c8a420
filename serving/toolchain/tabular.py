"""A scikit-learn classifier on feature rows, exported with skl2onnx: ``train.py --dataset iris``.

The model is the web-single-pattern tutorial's: ``StandardScaler`` then ``SVC(probability=True)``
on the four iris measurements. It is exported with skl2onnx (input ``input`` ``[N, F]`` float32,
outputs ``label`` and ``probabilities``, the float tensor rather than a ZipMap), and the export is
checked against ``predict_proba`` on the whole test split before anything is published. No pickle
of the model is written: the server loads no code, and ONNX is what it serves. scikit-learn and
skl2onnx are imported inside the function.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from serving.store.repository import ONNX_ARTIFACT
from serving.toolchain.data import Dataset
from serving.toolchain.export import INPUT_NAME, ONNX_TOLERANCE, OUTPUT_NAME, ExportError

#: The opset skl2onnx writes for the ai.onnx domain (its SVMClassifier lives in ai.onnx.ml).
SKL2ONNX_OPSET = 17


def train_svc(
    name: str, seed: int, dataset: Dataset, staging: Path, log: Callable[[str], None]
) -> tuple[np.ndarray, float, dict[str, str]]:
    """Fit the tutorial's SVM, write ``model.onnx``; returns the test probabilities scikit-learn
    computes, the export's largest difference from them, and the library versions."""
    import onnx
    import onnxruntime as ort
    import skl2onnx
    import sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    with warnings.catch_warnings():
        # scikit-learn 1.9 deprecates SVC(probability=True) for CalibratedClassifierCV; it is still
        # what the tutorial trains (and serving import reads either)
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*probab.*")
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*prob[AB]_.*")
        model = Pipeline(
            [("scale", StandardScaler()), ("svc", SVC(probability=True, random_state=seed))]
        )
        model.fit(dataset.x_train, dataset.y_train)
        native = np.asarray(model.predict_proba(dataset.x_test), dtype=np.float32)
        train_accuracy = float(np.mean(model.predict(dataset.x_train) == dataset.y_train))
        log(f"[{name}] fitted {len(dataset.y_train)} rows  train accuracy {train_accuracy:.4f}")
        features = dataset.shape[0]
        exported = skl2onnx.convert_sklearn(
            model,
            initial_types=[(INPUT_NAME, FloatTensorType([None, features]))],
            options={"zipmap": False},
            target_opset={"": SKL2ONNX_OPSET, "ai.onnx.ml": 1},
        )
    outputs = [output.name for output in exported.graph.output]
    if OUTPUT_NAME not in outputs:
        raise ExportError(f"skl2onnx wrote outputs {outputs}, without {OUTPUT_NAME!r}")
    onnx.save(exported, str(staging / ONNX_ARTIFACT))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        str(staging / ONNX_ARTIFACT), options, providers=["CPUExecutionProvider"]
    )
    (probabilities,) = session.run([OUTPUT_NAME], {INPUT_NAME: dataset.x_test})
    diff = float(np.max(np.abs(np.asarray(probabilities) - native)))
    if not diff < ONNX_TOLERANCE:
        raise ExportError(
            f"ONNX export disagrees with scikit-learn: max abs diff {diff:.3g} >= {ONNX_TOLERANCE}"
        )
    versions = {
        "scikit-learn": sklearn.__version__,
        "skl2onnx": skl2onnx.__version__,
        "onnx": onnx.__version__,
    }
    return native, diff, versions
