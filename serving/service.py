"""The protocol-agnostic data plane: liveness, readiness, metadata and inference over served models.

# design: one ``InferenceService`` per worker process serves a set of model versions: the default
# model (``SERVING_MODEL`` / ``SERVING_MODEL_VERSION``, the one the native API uses) plus whatever
# ``SERVING_MODELS`` selects. ``resolve`` only reads files, so the gunicorn master may call it to
# fail fast before forking; ``load`` imports the frameworks and must run in the worker
# (post_worker_init, or lazily on the first request when gunicorn.conf.py is not used). A model
# loaded in one process is never used in another: the owning pid is recorded and a forked child that
# inherited handles loads its own. Each version is a ``LoadedModel`` (its own backend, lock and, in
# batched mode, batcher thread); a request without a version gets the latest *served* version.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING

import numpy as np

from serving.admission import admit
from serving.backends import Backend, backend_class
from serving.batching import InFlight, MicroBatcher
from serving.config import Settings
from serving.errors import ConfigError, ModelLoadError, ModelNotFound, ModelNotReady
from serving.loaded_model import LoadedModel
from serving.observability import metrics
from serving.repository import ModelMetadata, ModelRepository

if TYPE_CHECKING:
    from serving.model_control import ControlFiles
    from serving.versions import Planner

log = logging.getLogger("serving")
DEFAULT_MODEL = "digits-tf"
MIN_BODY_LIMIT, BODY_ENVELOPE, BYTES_PER_VALUE = 256 * 1024, 64 * 1024, 24
Key = tuple[str, int]

__all__ = ["DEFAULT_MODEL", "InferenceService", "LoadedModel"]


class InferenceService:
    """Serves the default model and the selected model versions through their backends."""

    def __init__(self, settings: Settings, repository: ModelRepository | None = None) -> None:
        self.settings = settings
        self.repository = repository or ModelRepository(settings.model_repository)
        #: The default model (native API) and its backend, known once ``resolve`` ran.
        self.meta: ModelMetadata | None = None
        self.backend_name = ""
        #: Every served version: (name, version) -> (metadata, backend name), sorted.
        self.served: dict[Key, tuple[ModelMetadata, str]] = {}
        self._models: dict[Key, LoadedModel] = {}
        self._owner_pid = 0
        self._load_lock = threading.Lock()
        self._timeout_s = settings.request_timeout_ms / 1000.0
        self._max_client_timeout_s = (settings.max_client_timeout_ms or settings.request_timeout_ms) / 1000.0
        #: Requests this worker is serving now; the app counts them in batched mode.
        self.in_flight = InFlight()
        #: Versions left out because they failed their checks or their load (model control): key -> reason.
        self.failed: dict[Key, str] = {}
        self._planner: Planner | None = None
        self._body_limit: tuple[object, int] = (None, 0)
        #: Workers of this server (model control waits for each one's acknowledgement); set by the watcher.
        self.worker_count = 1
        self._control: ControlFiles | None = None

    # -- start-up -------------------------------------------------------------------------------
    def resolve(self) -> ModelMetadata:
        """Find every served version and check its artifact (no framework import; master-safe).

        Returns the default model's metadata.
        """
        selected: list[Key] = []
        if self.settings.models:
            try:
                selected = self.repository.select(self.settings.models)
            except ModelNotFound as exc:
                raise ModelLoadError(f"SERVING_MODELS: {exc.message}") from None
        if self.settings.model:
            wanted: tuple[str, int | None] = (self.settings.model, self.settings.model_version or None)
        else:
            wanted = self._default_model(selected)
        default, backend = self.check(self._find(*wanted))
        served = {(default.name, default.version): (default, backend)}
        for key in selected:
            if key not in served:
                served[key] = self.check(self._find(*key))
        self.served = dict(sorted(served.items()))
        self.meta, self.backend_name = default, backend
        return default

    def _find(self, name: str, version: int | None) -> ModelMetadata:
        try:
            return self.repository.resolve(name, version)
        except ModelNotFound as exc:
            raise ModelLoadError(exc.message) from None

    def check(self, meta: ModelMetadata) -> tuple[ModelMetadata, str]:
        """The backend that serves ``meta`` once its files pass their checks (``serving.admission``)."""
        return admit(meta, self.settings)

    def default_name(self, selected: list[Key]) -> str:
        """The native API's model name: SERVING_MODEL, else as ``resolve`` chooses it."""
        return self.settings.model or self._default_model([key for key in selected if key[1] is not None])[0]

    def _default_model(self, selected: list[Key]) -> tuple[str, int | None]:
        """The native API's model when SERVING_MODEL is empty: digits-tf, else the first selected or only one."""
        models = self.repository.models()
        if not models:
            raise ModelLoadError(f"no model in {self.repository.root}/: train one (`python train.py`), import one"
                                 " (`serving import`), or mount a model repository there")
        if selected:  # digits-tf's latest selected version if selected, else the first selected version
            tf = [key for key in selected if key[0] == DEFAULT_MODEL]
            return tf[-1] if tf else selected[0]
        if DEFAULT_MODEL in models:
            return DEFAULT_MODEL, self.settings.model_version or None
        if len(models) == 1:
            return models[0], self.settings.model_version or None
        raise ModelLoadError(
            f"{self.repository.root}/ holds several models ({', '.join(models)}): choose one with SERVING_MODEL"
        )

    def load(self, workers: int | None = None) -> None:
        """Load every served version in this process, capping math threads (idempotent, thread-safe)."""
        with self._load_lock:
            if self._models and self._owner_pid == os.getpid():
                return
            self.resolve()
            workers = workers or self.settings.workers
            threads = self.settings.math_threads_for(workers)
            for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
                os.environ[variable] = str(threads)
            models: dict[Key, LoadedModel] = {}
            try:
                for key, (meta, backend_name) in self.served.items():
                    models[key] = self._load_one(meta, backend_name, threads, workers)
            except BaseException:
                for model in models.values():
                    model.close()
                raise
            self._models, self._owner_pid = models, os.getpid()

    def _load_one(self, meta: ModelMetadata, backend_name: str, threads: int, workers: int) -> LoadedModel:
        started = time.perf_counter()
        backend = backend_class(backend_name)(meta, threads)
        backend.load()
        self._check_sample(backend, meta)
        model = LoadedModel(meta, backend_name, backend, self.settings, self.in_flight)
        model.load_seconds = time.perf_counter() - started
        model.start()
        metrics.MODEL_LOAD_SECONDS.labels(model.label).set(model.load_seconds)
        metrics.MODEL_INFO.labels(meta.name, str(meta.version), backend_name, meta.framework,
                                  self.settings.mode).set(1)
        s = self.settings
        log.info(
            "loaded model %s version %d with %s (%s) in %.2fs; math threads %d (workers %d, cores %d)%s",
            meta.name, meta.version, backend_name, backend.framework_version(), model.load_seconds,
            threads, workers, os.cpu_count() or 0,
            f"; batching: max_batch_size {s.max_batch_size}, max_delay_ms {s.max_delay_ms:g}, max_queue"
            f" {s.max_queue}, request_timeout_ms {s.request_timeout_ms}" if model.batcher else "",
        )
        return model

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
        if self._owner_pid == os.getpid():
            for model in self._models.values():
                model.close()

    def batchers(self) -> list[MicroBatcher]:
        """The batchers of every model loaded in this process (batched mode; empty otherwise)."""
        if self._owner_pid != os.getpid():
            return []
        return [model.batcher for model in self._models.values() if model.batcher is not None]

    @property
    def body_limit(self) -> int:
        """The largest request body: ``SERVING_MAX_BODY_BYTES``, or derived from the largest served input.

        A JSON sample of H x W numbers takes at most ~24 bytes a value (a float's shortest repr and a
        comma), so the cap admits a full batch with room to spare and nothing near the 50-100x of a fixed
        2 MiB cap on 8x8 inputs; binary v2 and image bodies are far smaller than their JSON.
        """
        if self.settings.max_body_bytes:
            return self.settings.max_body_bytes
        if not self.served:
            self._ensure_resolved()
        served = self.served
        if self._body_limit[0] is not served:  # computed once per model table, not per request
            pixels = max(meta.input_shape[0] * meta.input_shape[1] for meta, _ in served.values())
            self._body_limit = (served, max(MIN_BODY_LIMIT, BODY_ENVELOPE + self.settings.max_batch * pixels
                                            * BYTES_PER_VALUE))
        return self._body_limit[1]

    # -- requests -------------------------------------------------------------------------------
    @property
    def default_label(self) -> str:
        """The default model as logs label it, ``name:version`` ("-" until it is resolved)."""
        return f"{self.meta.name}:{self.meta.version}" if self.meta is not None else "-"

    @property
    def ready(self) -> bool:
        """True when this process has loaded every served model (and their model threads run)."""
        return bool(self._models) and self._owner_pid == os.getpid() and all(
            model.ready for model in self._models.values()
        )

    def model_ready(self, name: str, version: int | None = None) -> bool:
        """Whether one served version is loaded and running here; ModelNotFound when not served."""
        key = self.key(name, version)
        model = self._models.get(key) if self._owner_pid == os.getpid() else None
        return model is not None and model.ready

    def key(self, name: str, version: int | None = None) -> Key:
        """The served (name, version) a request addresses (latest served when ``version`` is None)."""
        if not self.served:
            self._ensure_resolved()
        versions = self.versions(name)
        if not versions:
            served = ", ".join(sorted({n for n, _ in self.served})) or "none"
            raise ModelNotFound(f"no model {name!r} is served here (models: {served})")
        if version is None:
            return name, versions[-1]
        if version not in versions:
            raise ModelNotFound(f"model {name!r} has no version {version} served here (versions: {versions})")
        return name, version

    def versions(self, name: str) -> list[int]:
        """The served versions of ``name``, ascending."""
        return [version for model, version in self.served if model == name]

    def _ensure_resolved(self) -> None:
        try:
            self.resolve()
        except (ModelLoadError, ConfigError) as exc:
            log.error("model not loaded: %s", exc)
            raise ModelNotReady("the model is not loaded in this worker; see the server log") from None

    def model(self, name: str | None = None, version: int | None = None) -> LoadedModel:
        """A served model loaded in this process (default: the native API's), loading them on first use."""
        if not self._models or self._owner_pid != os.getpid():
            try:
                self.load()
            except (ModelLoadError, ConfigError) as exc:
                log.error("model not loaded: %s", exc)
                raise ModelNotReady("the model is not loaded in this worker; see the server log") from None
        key = (self.meta.name, self.meta.version) if name is None and self.meta is not None else \
            self.key(name or "", version)
        model = self._models.get(key)
        if model is None:  # unloaded a moment ago (a version switch): the client may retry at once
            raise ModelNotReady(f"model {key[0]}:{key[1]} is being unloaded; retry")
        return model

    def predict(self, batch: np.ndarray, timeout_s: float | None = None,
                model: LoadedModel | None = None) -> np.ndarray:
        """Probabilities ``(N, classes)`` for a validated batch, within ``timeout_s`` (default: the setting).

        A client's deadline is clamped to ``SERVING_MAX_CLIENT_TIMEOUT_MS``.
        """
        timeout = min(timeout_s, self._max_client_timeout_s) if timeout_s else self._timeout_s
        return (model or self.model()).infer(batch, timeout)

    def labels_for(self, probabilities: np.ndarray) -> list[str]:
        """The default model's label of the most probable class for each row."""
        return self.model().labels_for(probabilities)

    def index(self, unserved: bool = False) -> list[dict[str, str]]:
        """Every served model version with its state here (READY or LOADING); with ``unserved`` (operators
        only) also the repository's other versions, as UNAVAILABLE."""
        if not self.served:
            self._ensure_resolved()
        entries = []
        for name, version in self.repository.index():
            entry = {"name": name, "version": str(version)}
            if (name, version) not in self.served:
                if not unserved and (name, version) not in self.failed:
                    continue
                reason = self.failed.get((name, version), "not selected by SERVING_MODELS or the version policy")
                entry.update(state="UNAVAILABLE", reason=reason)
            else:
                ready = self.model_ready(name, version)
                entry.update(state="READY" if ready else "LOADING", reason="" if ready else "not loaded yet")
            entries.append(entry)
        return entries
