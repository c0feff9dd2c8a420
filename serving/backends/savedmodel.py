"""TensorFlow SavedModel backend: the folder TF Serving serves (``saved_model.pb`` +
``variables/``).

Loaded with ``tf.saved_model.load`` and called through its serving signature (a concrete function:
no retracing, safe to call from several threads), with the same thread caps as the Keras backend.
The version directory is the SavedModel itself, so a TF Serving base path (``<name>/<version>/``)
is a model repository as it stands.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from serving.backends.base import Backend
from serving.backends.tensorflow import tensorflow_with_threads
from serving.errors import ModelLoadError

SIGNATURE = "serving_default"


class SavedModelBackend(Backend):
    """Runs the ``serving_default`` signature of the SavedModel in the version directory."""

    name = "savedmodel"
    thread_safe = True
    artifact = "saved_model.pb"
    platform = "tensorflow_savedmodel"
    framework = "tensorflow"
    framework_modules = ("tensorflow",)

    def load(self) -> None:
        tf = self._tf = tensorflow_with_threads(self.math_threads)
        try:
            self._loaded = tf.saved_model.load(str(self.metadata.path))
            function: Any = self._loaded.signatures[SIGNATURE]
        except KeyError:
            raise ModelLoadError(
                f"{self.metadata.path}: the SavedModel has no {SIGNATURE!r} signature"
            ) from None
        except Exception as exc:  # tensorflow raises OSError, ValueError and its own errors
            raise ModelLoadError(
                f"cannot load the SavedModel in {self.metadata.path}: {exc}"
            ) from exc
        self._function = function
        self._input, self._output = self.metadata.input_name, self.metadata.output_name
        self._dtype = (
            tf.uint8 if self.metadata.raw.get("input", {}).get("dtype") == "uint8" else tf.float32
        )

    def predict(self, batch: np.ndarray) -> np.ndarray:
        tensor = self._tf.constant(self._layout(batch), dtype=self._dtype)
        return self._probabilities(self._function(**{self._input: tensor})[self._output].numpy())

    def framework_version(self) -> str:
        return f"tensorflow {self._tf.__version__}"
