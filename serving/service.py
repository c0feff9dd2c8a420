"""The protocol-agnostic data plane: liveness, readiness, metadata and inference.

# design: one ``InferenceService`` per worker process. ``resolve`` only reads files, so the gunicorn
# master may call it to fail fast before forking; ``load`` imports the framework and must run in
# the worker (post_worker_init, or lazily on the first request when gunicorn.conf.py is not used).
# A model loaded in one process is never used in another: the owning pid is recorded and a forked
# child that inherited a handle loads its own. In batched mode each model gets a ``MicroBatcher``
# whose thread is the only caller of the backend; otherwise request threads call it directly, and a
# backend that is not thread-safe gets a lock so even a misconfigured server serialises its calls.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np

from serving.backends import Backend, backend_class, is_thread_safe
from serving.batching import BatchStats, InFlight, MicroBatcher
from serving.config import Settings
from serving.errors import ConfigError, InferenceError, ModelLoadError, ModelNotFound, ModelNotReady
from serving.inputs import CONTRACT, IMAGE_TYPES
from serving.observability import metrics
from serving.repository import ModelMetadata, ModelRepository

log = logging.getLogger("serving")
DEFAULT_MODEL = "digits-tf"


class LoadedModel:
    """One model version loaded in this worker: its backend and, in batched mode, its batcher."""

    def __init__(self, meta: ModelMetadata, backend_name: str, backend: Backend, settings: Settings,
                 in_flight: InFlight | None = None) -> None:
        self.meta = meta
        self.backend_name = backend_name
        self.backend = backend
        self.load_seconds = 0.0
        self._call_lock: AbstractContextManager[Any] = nullcontext() if backend.thread_safe else threading.Lock()
        self._label = f"{meta.name}:{meta.version}"
        self._latency = metrics.INFERENCE_LATENCY.labels(self._label)
        self._batch_sizes = metrics.BATCH_SIZE.labels(self._label)
        self._depth = metrics.QUEUE_DEPTH.labels(self._label)
        self.batcher: MicroBatcher | None = None
        if settings.mode == "batched":
            self.batcher = MicroBatcher(
                self.run, settings.max_batch_size, settings.max_delay_ms, settings.max_queue, name=self._label,
                on_batch=self._observe_batch, in_flight=in_flight,
            )

    def start(self) -> None:
        if self.batcher is not None:
            self.batcher.start()

    @property
    def ready(self) -> bool:
        return self.batcher is None or self.batcher.running

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Call the backend once; InferenceError (500, details logged) if it fails or misbehaves."""
        try:
            with self._call_lock:
                output = self.backend.predict(batch)
        except Exception:
            log.exception("inference failed for a batch of %d on %s", len(batch), self._label)
            raise InferenceError("inference failed; the error is in the server log") from None
        if output.shape != (len(batch), len(self.meta.labels)):
            log.error("%s returned shape %s for a batch of %d", self._label, output.shape, len(batch))
            raise InferenceError("the model returned an output of the wrong shape")
        return output

    def infer(self, batch: np.ndarray, timeout_s: float) -> np.ndarray:
        """Probabilities for ``batch``: through the batcher in batched mode, else a direct timed call."""
        if self.batcher is not None:
            self._depth.set(self.batcher.depth() + 1)
            try:
                return self.batcher.submit(batch, timeout_s)
            finally:
                self._depth.set(self.batcher.depth())
        started = time.perf_counter()
        output = self.run(batch)
        self._latency.observe(time.perf_counter() - started)
        self._batch_sizes.observe(len(batch))
        return output

    def _observe_batch(self, stats: BatchStats) -> None:
        self._latency.observe(stats.seconds)
        self._batch_sizes.observe(stats.samples)

    def close(self) -> None:
        """Drain and stop the batcher (queued requests are answered first)."""
        if self.batcher is not None:
            self.batcher.stop()


class InferenceService:
    """Serves the configured model version through the configured backend."""

    def __init__(self, settings: Settings, repository: ModelRepository | None = None) -> None:
        self.settings = settings
        self.repository = repository or ModelRepository(settings.model_repository)
        self.meta: ModelMetadata | None = None
        self.backend_name = ""
        self._model: LoadedModel | None = None
        self._owner_pid = 0
        self._load_lock = threading.Lock()
        self._timeout_s = settings.request_timeout_ms / 1000.0
        #: Requests this worker is serving now; the app counts them in batched mode.
        self.in_flight = InFlight()

    # -- start-up -------------------------------------------------------------------------------
    def resolve(self) -> ModelMetadata:
        """Find the model version and check its artifact (no framework import; master-safe)."""
        name = self.settings.model or self._default_model_name()
        try:
            meta = self.repository.resolve(name, self.settings.model_version or None)
        except ModelNotFound as exc:
            raise ModelLoadError(exc.message) from None
        backend = self.settings.backend or meta.framework
        backend_class(backend)  # refuses an unknown backend with a message naming the known ones
        if backend in ("tensorflow", "pytorch") and backend != meta.framework:
            raise ModelLoadError(
                f"model {meta.name} was trained with {meta.framework}; the {backend} backend cannot load it"
                f" (use SERVING_BACKEND={meta.framework} or onnx)"
            )
        if self.settings.mode == "threaded" and not is_thread_safe(backend):
            raise ConfigError(
                f"the {backend} backend is process-only: use SERVING_MODE=process, SERVING_MODE=batched (one model"
                " thread), or SERVING_BACKEND=onnx to serve its ONNX export with threads"
            )
        meta.verify(backend_class(backend).artifact)
        self.meta, self.backend_name = meta, backend
        return meta

    def _default_model_name(self) -> str:
        models = self.repository.models()
        if not models:
            raise ModelLoadError(f"no model in {self.repository.root}/: run `python train.py`")
        if DEFAULT_MODEL in models:
            return DEFAULT_MODEL
        if len(models) == 1:
            return models[0]
        raise ModelLoadError(
            f"{self.repository.root}/ holds several models ({', '.join(models)}): choose one with SERVING_MODEL"
        )

    def load(self, workers: int | None = None) -> None:
        """Load the backend in this process, capping its math threads (idempotent, thread-safe)."""
        with self._load_lock:
            if self._model is not None and self._owner_pid == os.getpid():
                return
            meta = self.resolve()
            workers = workers or self.settings.workers
            threads = self.settings.math_threads_for(workers)
            for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
                os.environ[variable] = str(threads)
            started = time.perf_counter()
            backend = backend_class(self.backend_name)(meta, threads)
            backend.load()
            self._check_sample(backend, meta)
            model = LoadedModel(meta, self.backend_name, backend, self.settings, self.in_flight)
            model.load_seconds = time.perf_counter() - started
            model.start()
            self._model, self._owner_pid = model, os.getpid()
            label = f"{meta.name}:{meta.version}"
            metrics.MODEL_LOAD_SECONDS.labels(label).set(model.load_seconds)
            metrics.MODEL_INFO.labels(meta.name, str(meta.version), self.backend_name, meta.framework,
                                      self.settings.mode).set(1)
            s = self.settings
            log.info(
                "loaded model %s version %d with %s (%s) in %.2fs; math threads %d (workers %d, cores %d)%s",
                meta.name, meta.version, self.backend_name, backend.framework_version(), model.load_seconds,
                threads, workers, os.cpu_count() or 0,
                f"; batching: max_batch_size {s.max_batch_size}, max_delay_ms {s.max_delay_ms:g}, max_queue"
                f" {s.max_queue}, request_timeout_ms {s.request_timeout_ms}" if model.batcher else "",
            )

    @staticmethod
    def _check_sample(backend: Backend, meta: ModelMetadata) -> None:
        """Run the built-in sample once: warms the model and catches a broken artifact at start."""
        data, _ = meta.sample()
        height, width = meta.input_shape
        output = backend.predict(np.asarray(data, dtype=np.float32).reshape(1, height, width))
        if output.shape != (1, len(meta.labels)):
            raise ModelLoadError(f"{meta.path}: the model returned shape {output.shape} for one sample")

    def close(self) -> None:
        """Answer everything queued, then stop the model threads (worker exit)."""
        if self._model is not None and self._owner_pid == os.getpid():
            self._model.close()

    # -- requests -------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """True when this process has its own loaded model (and its model thread runs)."""
        return self._model is not None and self._owner_pid == os.getpid() and self._model.ready

    def model(self) -> LoadedModel:
        """This process's model, loading it on first use when no gunicorn hook did."""
        if self._model is None or self._owner_pid != os.getpid():
            try:
                self.load()
            except (ModelLoadError, ConfigError) as exc:
                log.error("model not loaded: %s", exc)
                raise ModelNotReady("the model is not loaded in this worker; see the server log") from None
        assert self._model is not None
        return self._model

    def predict(self, batch: np.ndarray, timeout_s: float | None = None) -> np.ndarray:
        """Probabilities ``(N, classes)`` for a validated batch, within ``timeout_s`` (default setting)."""
        return self.model().infer(batch, timeout_s or self._timeout_s)

    def labels_for(self, probabilities: np.ndarray) -> list[str]:
        """The label of the most probable class for each row."""
        labels = self.model().meta.labels
        return [labels[i] for i in probabilities.argmax(axis=1).tolist()]

    def metadata(self) -> dict[str, Any]:
        """Model metadata and the input contract, as served by ``GET /metadata``."""
        model = self.model()
        meta, raw = model.meta, model.meta.raw
        document: dict[str, Any] = {
            "name": meta.name,
            "version": meta.version,
            "framework": meta.framework,
            "backend": model.backend_name,
            "backend_version": model.backend.framework_version(),
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
        if model.batcher is not None:
            s = self.settings
            document["batching"] = {"max_batch_size": s.max_batch_size, "max_delay_ms": s.max_delay_ms,
                                    "max_queue": s.max_queue, "request_timeout_ms": s.request_timeout_ms}
        return document
