"""Backends with faults on demand, for tests: ``SERVING_BACKEND=tests.fakes:FaultyOnnx`` (or ``FaultyVersion``).

``FaultyOnnx`` is the real ONNX Runtime backend, except that a sample whose first pixel holds a magic value
makes the whole model call misbehave: 0.125 sleeps SLOW_S, 0.25 raises, 0.375 returns the wrong
shape, 0.5 hangs for HANG_S. Digits samples always have 0 in that corner, so real data is unaffected.
"""

from __future__ import annotations

import time
from pathlib import Path

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


class FaultyVersion(OnnxRuntimeBackend):
    """ONNX Runtime with a fault chosen per version, for canary tests: ``SERVING_BACKEND=tests.fakes:FaultyVersion``.

    A version whose metadata.json holds ``"test_fault": {"kind": KIND, "when": PATH}`` misbehaves on every
    call while the file PATH exists (always, without ``when``): ``raise`` fails the call (a 500), ``slow`` adds
    SLOW_S to it, ``wrong`` answers with every class moved by one (answers that disagree with the others').
    Every other version is the plain ONNX Runtime backend. The load's sample check runs before ``when`` exists.
    """

    def load(self) -> None:
        super().load()
        fault = self.metadata.raw.get("test_fault") or {}
        self._fault: str = fault.get("kind", "")
        self._when = Path(fault["when"]) if fault.get("when") else None

    def predict(self, batch: np.ndarray) -> np.ndarray:
        output = super().predict(batch)
        if not self._fault or (self._when is not None and not self._when.exists()):
            return output
        if self._fault == "raise":
            raise RuntimeError("injected fault of a candidate version")
        if self._fault == "slow":
            time.sleep(SLOW_S)
        if self._fault == "wrong":
            return np.roll(output, 1, axis=1)
        return output


class SlowLoad(OnnxRuntimeBackend):
    """ONNX Runtime whose load takes SLOW_LOAD_S: a server stopped while its models load.

    Its load sleeps in the process that loads it: with the model pool, the pool process, while the HTTP workers
    wait for the pool to serve the model."""

    preloadable = classmethod(lambda cls, math_threads: False)  # type: ignore[assignment]

    def load(self) -> None:
        time.sleep(SLOW_LOAD_S)
        super().load()


SLOW_LOAD_S = 60.0
