"""The small interface every backend implements, and what each backend says about itself.

A backend turns a float32 batch shaped ``(N, H, W)`` (images) or ``(N, F)`` (feature rows) into
float32 probabilities ``(N, classes)``.
Each backend module imports its framework inside ``load``, so importing ``serving`` (in the
gunicorn master, say) never imports TensorFlow, PyTorch or onnxruntime. Everything else that
depends on the backend (its name, the file it loads, whether threads may share it, its v2 platform
string, which training framework's artifacts it reads) is a class attribute here, declared once, and
read by the settings, the service, the v2 metadata and the import command.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

from serving.store.repository import ModelMetadata

#: How a model wants its input, from ``metadata.json`` (``input.layout``); the server's batch is (N,
#: H, W) for images, (N, F) for feature rows (always "flat").
LAYOUTS = ("NHWC", "NCHW", "NHW", "flat")


class Backend(ABC):
    """Runs one model version. Create it in the worker, call ``load`` once, then ``predict``."""

    name: ClassVar[str]
    #: Whether several request threads may call ``predict`` at once (threaded mode).
    thread_safe: ClassVar[bool]
    #: The artifact inside the version directory that ``load`` reads (a file; for a SavedModel, its
    #: .pb).
    artifact: ClassVar[str]
    #: The ``platform`` of the v2 model metadata (KServe/Triton names).
    platform: ClassVar[str] = "custom"
    #: The training framework whose native artifacts this backend reads; "" reads an export of any.
    framework: ClassVar[str] = ""
    #: What the gunicorn master imports before fork (SERVING_SHARE_MEMORY) so that every worker
    #: shares the framework's code and import-time heap. Importing runs no model: what hangs a
    #: forked worker is a framework's thread pools started by a model call in the master.
    framework_modules: ClassVar[tuple[str, ...]] = ()
    #: Whether ``load`` may run in the gunicorn master, so that every worker shares the loaded
    #: model: true only where loading starts no thread and runs nothing (``preloadable``).
    fork_safe_load: ClassVar[bool] = False

    @classmethod
    def preloadable(cls, math_threads: int) -> bool:
        """Whether a model loaded with ``math_threads`` in the master stays usable in a forked
        worker."""
        return cls.fork_safe_load

    def __init__(self, metadata: ModelMetadata, math_threads: int) -> None:
        self.metadata = metadata
        self.math_threads = math_threads
        spec = metadata.raw.get("input", {})
        # Read once: ``_layout`` and ``_probabilities`` run on every model call.
        self._layout_kind: str = spec.get("layout", "NHWC")
        self._uint8 = spec.get("dtype") == "uint8"
        # skl2onnx models exported with DoubleTensorType take float64 rows
        self._float64 = spec.get("dtype") == "float64"
        self._activation: str | None = metadata.raw.get("output", {}).get("activation")

    @abstractmethod
    def load(self) -> None:
        """Import the framework, cap its threads to ``math_threads`` and load the artifact."""

    @abstractmethod
    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities ``(N, classes)`` float32 for a float32 batch ``(N, H, W)`` / ``(N, F)``."""

    def framework_version(self) -> str:
        """Version string of the framework, for logs (after ``load``)."""
        return ""

    def limit_math_threads(self, threads: int) -> bool:
        """Run on ``threads`` math threads from now on, after ``load``; False where the framework
        cannot change them once a model is loaded (the model pool's priority needs cores left to
        the HTTP workers: ``serving.host.priority``)."""
        return False

    def _layout(self, batch: np.ndarray) -> np.ndarray:
        """The batch as the model takes it: channel axis (NHWC, NCHW), as is (NHW) or flat; uint8
        or float64 if asked."""
        layout = self._layout_kind
        if layout == "NHWC":
            shaped = batch[..., np.newaxis]
        elif layout == "NCHW":
            shaped = batch[:, np.newaxis, :, :]
        elif layout == "NHW":
            shaped = batch
        else:
            shaped = batch.reshape(len(batch), -1)
        if self._uint8:
            return np.rint(shaped).astype(np.uint8)
        return shaped.astype(np.float64) if self._float64 else shaped

    def _probabilities(self, output: np.ndarray) -> np.ndarray:
        """The model's output as float32 probabilities: a softmax when ``output.activation`` says
        logits.

        ``auto`` (a TF Serving folder, where nothing records it) decides once, from the first
        output: rows that are already distributions stay as they are.
        """
        activation = self._activation
        if activation is None or activation == "softmax":
            return output if output.dtype == np.float32 else output.astype(np.float32)
        output = np.asarray(output, dtype=np.float32)
        if activation == "auto":
            sums = output.sum(axis=1)
            activation = (
                "softmax" if output.min() >= 0 and np.allclose(sums, 1.0, atol=1e-3) else "logits"
            )
            self._activation = activation
        if activation != "logits":
            return output
        shifted = np.exp(output - output.max(axis=1, keepdims=True))
        result: np.ndarray = shifted / shifted.sum(axis=1, keepdims=True)
        return result


#: Versions loaded in the gunicorn master before fork (SERVING_SHARE_MEMORY), by ``preload_key``;
#: a worker takes its model from here when the artifact is still the one loaded.
PRELOADED: dict[tuple[str, str, int, int, int], Backend] = {}


def preload_key(
    backend: type[Backend], metadata: ModelMetadata, math_threads: int
) -> tuple[str, str, int, int, int]:
    """Which loaded model a worker may take: backend, artifact, its size and mtime, and threads."""
    artifact = metadata.path / backend.artifact
    stat = artifact.stat()
    return (backend.name, str(artifact), stat.st_size, stat.st_mtime_ns, math_threads)
