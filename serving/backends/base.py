"""The small interface every framework backend implements.

A backend turns a float32 batch shaped ``(N, H, W)`` into float32 probabilities ``(N, classes)``.
Each backend module imports its framework inside ``load``, so importing ``serving`` (in the
gunicorn master, say) never imports TensorFlow, PyTorch or onnxruntime.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

from serving.repository import ModelMetadata


class Backend(ABC):
    """Runs one model version. Create it in the worker, call ``load`` once, then ``predict``."""

    name: ClassVar[str]
    #: Whether several request threads may call ``predict`` at once (threaded mode).
    thread_safe: ClassVar[bool]
    #: The artifact file inside the version directory that ``load`` reads.
    artifact: ClassVar[str]

    def __init__(self, metadata: ModelMetadata, math_threads: int) -> None:
        self.metadata = metadata
        self.math_threads = math_threads

    @abstractmethod
    def load(self) -> None:
        """Import the framework, cap its threads to ``math_threads`` and load the artifact."""

    @abstractmethod
    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities ``(N, classes)`` float32 for a float32 batch ``(N, H, W)``."""

    def framework_version(self) -> str:
        """Version string of the framework, for /metadata (after ``load``)."""
        return ""

    def _layout(self, batch: np.ndarray) -> np.ndarray:
        """Add the channel axis where the model's layout wants it (NHWC or NCHW)."""
        if self.metadata.raw.get("input", {}).get("layout") == "NCHW":
            return batch[:, np.newaxis, :, :]
        return batch[..., np.newaxis]
