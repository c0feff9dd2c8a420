"""The protocol-agnostic data plane: liveness, readiness, metadata and inference for one model.

# design: one ``InferenceService`` per worker process. ``resolve`` only reads files, so the gunicorn
# master may call it to fail fast before forking; ``load`` imports the framework and must run in
# the worker (post_worker_init, or lazily on the first request when gunicorn.conf.py is not used).
# A model loaded in one process is never used in another: the owning pid is recorded and a forked
# child that inherited a handle loads its own. Backends that are not thread-safe get a lock, so
# even a misconfigured threaded server serialises calls instead of corrupting them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np

from serving.backends import THREAD_SAFE, Backend, backend_class
from serving.config import Settings
from serving.errors import ConfigError, InferenceError, ModelLoadError, ModelNotFound, ModelNotReady
from serving.inputs import CONTRACT, IMAGE_TYPES
from serving.repository import ModelMetadata, ModelRepository

log = logging.getLogger("serving")
DEFAULT_MODEL = "digits-tf"


class InferenceService:
    """Serves the configured model version through the configured backend."""

    def __init__(self, settings: Settings, repository: ModelRepository | None = None) -> None:
        self.settings = settings
        self.repository = repository or ModelRepository(settings.model_repository)
        self.meta: ModelMetadata | None = None
        self.backend_name = ""
        self._backend: Backend | None = None
        self._owner_pid = 0
        self._load_lock = threading.Lock()
        self._call_lock: AbstractContextManager[Any] = nullcontext()
        self.load_seconds = 0.0

    # -- start-up -------------------------------------------------------------------------------
    def resolve(self) -> ModelMetadata:
        """Find the model version and check its artifact (no framework import; master-safe)."""
        name = self.settings.model or self._default_model_name()
        try:
            meta = self.repository.resolve(name, self.settings.model_version or None)
        except ModelNotFound as exc:
            raise ModelLoadError(exc.message) from None
        backend = self.settings.backend or meta.framework
        if backend not in THREAD_SAFE:
            raise ModelLoadError(f"{meta.path}: unknown framework {backend!r}; set SERVING_BACKEND")
        if backend in ("tensorflow", "pytorch") and backend != meta.framework:
            raise ModelLoadError(
                f"model {meta.name} was trained with {meta.framework}; the {backend} backend cannot load it"
                f" (use SERVING_BACKEND={meta.framework} or onnx)"
            )
        if self.settings.mode == "threaded" and not THREAD_SAFE[backend]:
            raise ConfigError(
                f"the {backend} backend is process-only: use SERVING_MODE=process, or SERVING_BACKEND=onnx"
                " to serve its ONNX export with threads"
            )
        meta.verify(backend_class(backend).artifact)
        self.meta, self.backend_name = meta, backend
        return meta

    def _default_model_name(self) -> str:
        models = self.repository.models()
        if DEFAULT_MODEL in models or not models:
            if not models:
                raise ModelLoadError(f"no model in {self.repository.root}/: run `python train.py`")
            return DEFAULT_MODEL
        if len(models) == 1:
            return models[0]
        raise ModelLoadError(
            f"{self.repository.root}/ holds several models ({', '.join(models)}): choose one with SERVING_MODEL"
        )

    def load(self, workers: int | None = None) -> None:
        """Load the backend in this process, capping its math threads (idempotent, thread-safe)."""
        with self._load_lock:
            if self._backend is not None and self._owner_pid == os.getpid():
                return
            meta = self.resolve()
            threads = self.settings.math_threads_for(workers or self.settings.workers)
            for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
                os.environ[variable] = str(threads)
            started = time.perf_counter()
            backend = backend_class(self.backend_name)(meta, threads)
            backend.load()
            self._check_sample(backend, meta)
            self.load_seconds = time.perf_counter() - started
            self._call_lock = nullcontext() if backend.thread_safe else threading.Lock()
            self._backend, self._owner_pid = backend, os.getpid()
            log.info(
                "loaded model %s version %d with %s (%s) in %.2fs; math threads %d (workers %d, cores %d)",
                meta.name, meta.version, self.backend_name, backend.framework_version(), self.load_seconds,
                threads, workers or self.settings.workers, os.cpu_count() or 0,
            )

    @staticmethod
    def _check_sample(backend: Backend, meta: ModelMetadata) -> None:
        """Run the built-in sample once: warms the model and catches a broken artifact at start."""
        data, _ = meta.sample()
        height, width = meta.input_shape
        output = backend.predict(np.asarray(data, dtype=np.float32).reshape(1, height, width))
        if output.shape != (1, len(meta.labels)):
            raise ModelLoadError(f"{meta.path}: the model returned shape {output.shape} for one sample")

    # -- requests -------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """True when this process has its own loaded model."""
        return self._backend is not None and self._owner_pid == os.getpid()

    def backend(self) -> Backend:
        """This process's backend, loading it on first use when no gunicorn hook did."""
        if not self.ready:
            try:
                self.load()
            except (ModelLoadError, ConfigError) as exc:
                log.error("model not loaded: %s", exc)
                raise ModelNotReady("the model is not loaded in this worker; see the server log") from None
        assert self._backend is not None
        return self._backend

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities ``(N, classes)`` for a validated batch; InferenceError if the model misbehaves."""
        backend = self.backend()
        assert self.meta is not None
        try:
            with self._call_lock:
                output = backend.predict(batch)
        except Exception:
            log.exception("inference failed for a batch of %d", len(batch))
            raise InferenceError("inference failed; the error is in the server log") from None
        if output.shape != (len(batch), len(self.meta.labels)):
            log.error("model returned shape %s for a batch of %d", output.shape, len(batch))
            raise InferenceError("the model returned an output of the wrong shape")
        return output

    def labels_for(self, probabilities: np.ndarray) -> list[str]:
        """The label of the most probable class for each row."""
        assert self.meta is not None
        labels = self.meta.labels
        return [labels[i] for i in probabilities.argmax(axis=1).tolist()]

    def metadata(self) -> dict[str, Any]:
        """Model metadata and the input contract, as served by ``GET /metadata``."""
        self.backend()
        assert self.meta is not None and self._backend is not None
        meta, raw = self.meta, self.meta.raw
        return {
            "name": meta.name,
            "version": meta.version,
            "framework": meta.framework,
            "backend": self.backend_name,
            "backend_version": self._backend.framework_version(),
            "mode": self.settings.mode,
            "arch": raw.get("arch"),
            "dataset": raw.get("dataset"),
            "accuracy": raw.get("test_accuracy"),
            "created": raw.get("created"),
            "input": {
                "name": meta.input_name,
                "shape": list(meta.input_shape),
                "dtype": meta.input_dtype,
                "range": list(meta.input_range),
                "max_batch": self.settings.max_batch,
                "contract": CONTRACT,
                "content_types": ["application/json", "multipart/form-data", *IMAGE_TYPES],
            },
            "output": {"name": meta.output_name, "shape": [len(meta.labels)], "dtype": "float32"},
            "labels": meta.labels,
        }
