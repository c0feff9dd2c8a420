"""ONNX Runtime backend: the fastest per call, thread-safe, serves exports of either framework."""

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
        self._outputs: list[Any] = [self._session.get_outputs()[0].name]

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self._probabilities(
            self._session.run(self._outputs, {self._input: self._layout(batch)})[0]
        )

    def framework_version(self) -> str:
        return f"onnxruntime {self._ort_version}"
