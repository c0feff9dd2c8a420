"""ONNX Runtime backend: the fastest per call, thread-safe, serves exports of either framework and
scikit-learn models converted with skl2onnx.

A model may have several outputs (skl2onnx writes the label first, then the probabilities): the one
served is the output named in ``metadata.json``, else the first. skl2onnx's default probability
output is a ZipMap, a sequence of ``{class: probability}`` maps; ``output.keys`` (written by
``serving import``) gives the class of each column, in the order of the labels.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from serving.backends.base import Backend
from serving.errors import ModelLoadError


class OnnxRuntimeBackend(Backend):
    """Runs ``model.onnx`` with one InferenceSession shared by all request threads."""

    name = "onnx"
    thread_safe = True
    artifact = "model.onnx"
    platform = "onnxruntime_onnx"
    framework_modules = ("onnxruntime",)
    # An InferenceSession with one intra-op thread starts no thread and runs nothing when created:
    # made in the master, it serves every forked worker (docs/modes.md, fork safety). With more,
    # onnxruntime starts its pool's threads at creation, and a forked worker would not have them.
    fork_safe_load = True

    @classmethod
    def preloadable(cls, math_threads: int) -> bool:
        return math_threads == 1

    def load(self) -> None:
        import onnxruntime as ort

        self._ort_version = ort.__version__
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.math_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning intra-op threads burn the cores other workers need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(
                str(self.metadata.path / self.artifact),
                sess_options=options,
                providers=["CPUExecutionProvider"],
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelLoadError(
                f"cannot load {self.metadata.path / self.artifact}: {exc}"
            ) from exc
        self._input = self._session.get_inputs()[0].name
        outputs = {output.name: output for output in self._session.get_outputs()}
        chosen = outputs.get(self.metadata.output_name) or self._session.get_outputs()[0]
        self._outputs: list[Any] = [chosen.name]
        #: a ZipMap output: the class key of each probability column, in the labels' order
        self._keys: list[Any] | None = None
        if str(chosen.type).startswith("seq(map("):
            keys = self.metadata.raw.get("output", {}).get("keys")
            if not isinstance(keys, list) or len(keys) != len(self.metadata.labels):
                raise ModelLoadError(
                    f"{self.metadata.name}:{self.metadata.version}: output {chosen.name!r} is a"
                    " ZipMap and metadata.json gives no output.keys (its classes): import the"
                    " model with serving import"
                )
            self._keys = keys

    def limit_math_threads(self, threads: int) -> bool:
        """A session's threads are fixed when it is made: a new one (a fraction of a second)."""
        if threads != self.math_threads:
            self.math_threads = threads
            self.load()
        return True

    def predict(self, batch: np.ndarray) -> np.ndarray:
        output = self._session.run(self._outputs, {self._input: self._layout(batch)})[0]
        if self._keys is not None:
            output = np.array([[row[key] for key in self._keys] for row in output], np.float32)
        return self._probabilities(output)

    def framework_version(self) -> str:
        return f"onnxruntime {self._ort_version}"
