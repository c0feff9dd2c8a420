"""A backend with faults on demand, for tests: ``SERVING_BACKEND=tests.fakes:FaultyOnnx``.

It is the real ONNX Runtime backend, except that a sample whose first pixel holds a magic value
makes the whole model call misbehave: 0.125 sleeps SLOW_S, 0.25 raises, 0.375 returns the wrong
shape, 0.5 hangs for HANG_S. Digits samples always have 0 in that corner, so real data is unaffected.
"""

from __future__ import annotations

import time

import numpy as np

from serving.backends.onnx import OnnxRuntimeBackend

SLOW, RAISE, WRONG_SHAPE, HANG = 0.125, 0.25, 0.375, 0.5
SLOW_S = 0.2
HANG_S = 30.0


class FaultyOnnx(OnnxRuntimeBackend):
    """ONNX Runtime with a fault chosen by the first pixel of any sample in the batch."""

    def predict(self, batch: np.ndarray) -> np.ndarray:
        corner = set(np.round(batch[:, 0, 0], 3).tolist())
        if HANG in corner:
            time.sleep(HANG_S)
        if SLOW in corner:
            time.sleep(SLOW_S)
        if RAISE in corner:
            raise RuntimeError("injected fault: /secret/path/model.py line 42")
        output = super().predict(batch)
        if WRONG_SHAPE in corner:
            return output[:, :3]
        return output
