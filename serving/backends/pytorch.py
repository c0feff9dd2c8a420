"""PyTorch backend: TorchScript only, so loading never unpickles arbitrary Python objects.

Not thread-safe for our purposes: concurrent calls into one module from several request threads
oversubscribe the cores and have deadlocked after fork; serve it in process mode.
"""

from __future__ import annotations

import numpy as np

from serving.backends.base import Backend
from serving.errors import ModelLoadError


class TorchScriptBackend(Backend):
    """Runs ``model.pt`` (a TorchScript archive) under ``torch.inference_mode``."""

    name = "pytorch"
    thread_safe = False
    artifact = "model.pt"
    platform = "pytorch_torchscript"
    framework = "pytorch"
    framework_modules = ("torch",)
    # Loading (and freezing) a TorchScript archive starts no thread and runs no operator: loaded in
    # the master, the module serves every forked worker (measured: the fork-safety table in
    # docs/modes.md). Running it there would start the intra-op pool and hang the workers.
    fork_safe_load = True

    def load(self) -> None:
        import torch

        self._torch = torch
        torch.set_num_threads(self.math_threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already set, or parallel work has started: keep what is there
            pass
        # The profiling executor records each worker's first calls and builds an optimized graph
        # per process: 3 MB private per worker, for no speed on these models (measured 26 / 316
        # us at batch 1 / 32 either way). The simple executor runs the frozen graph as loaded.
        set_profiling = getattr(torch._C, "_jit_set_profiling_executor", None)
        if set_profiling is not None:
            set_profiling(False)
        try:
            module = torch.jit.load(str(self.metadata.path / self.artifact), map_location="cpu")
        except Exception as exc:  # torch raises RuntimeError and friends for bad archives
            raise ModelLoadError(
                f"cannot load {self.metadata.path / self.artifact} as TorchScript: {exc}"
            ) from exc
        module.eval()
        # folds weights into the graph; optimize_for_inference asserts
        self._module = torch.jit.freeze(module)

    def limit_math_threads(self, threads: int) -> bool:
        self._torch.set_num_threads(threads)  # the intra-op pool takes it at its next call
        self.math_threads = threads
        return True

    def predict(self, batch: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            output = self._module(self._torch.from_numpy(np.ascontiguousarray(self._layout(batch))))
        return self._probabilities(output.numpy())

    def framework_version(self) -> str:
        return f"torch {self._torch.__version__}"
