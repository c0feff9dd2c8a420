"""The protocol-agnostic data plane: liveness, readiness, metadata and inference over served models.

# design: one ``InferenceService`` per worker process serves one ``ModelTable`` (``self.table``):
# the default model (``SERVING_MODEL`` / ``SERVING_MODEL_VERSION``, the one the native API uses)
# plus what ``SERVING_MODELS`` selects, as the ``Planner`` decides. ``resolve`` only reads files, so
# the gunicorn master may call it to fail fast before forking; ``load`` imports the frameworks and
# must run in the worker (post_worker_init, or lazily on the first request when gunicorn.conf.py is
# not used). A model loaded in one process is never used in another: the table records the process
# that loaded it, and a forked child that inherited one loads its own. Each version is a
# ``LoadedModel`` (its own backend, lock and, in batched mode, batcher thread); a request without a
# version gets the latest *served* version. Model control (``serving.runtime.model_control``)
# changes the table only through ``swap``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from serving.backends import Backend, backend_class
from serving.backends.base import PRELOADED, preload_key
from serving.config import Settings
from serving.errors import ConfigError, ModelLoadError, ModelNotReady
from serving.observability import metrics
from serving.runtime.batching import InFlight, MicroBatcher
from serving.runtime.loaded_model import LoadedModel, Route
from serving.runtime.model_pool import PoolClient, PooledBackend
from serving.runtime.model_table import EMPTY_TABLE, ModelTable
from serving.runtime.pool_wire import mapping_size
from serving.runtime.release import Header
from serving.runtime.traffic import Traffic, check_rule
from serving.runtime.versions import DEFAULT_MODEL, Key, Plan, Planner, Served
from serving.store.repository import ModelMetadata, ModelRepository

log = logging.getLogger("serving")
MIN_BODY_LIMIT, BODY_ENVELOPE, BYTES_PER_VALUE = 256 * 1024, 64 * 1024, 24

__all__ = ["DEFAULT_MODEL", "InferenceService", "Key", "LoadedModel", "ModelTable", "Route"]


class InferenceService:
    """Serves the default model and the selected model versions through their backends."""

    def __init__(self, settings: Settings, repository: ModelRepository | None = None) -> None:
        self.settings = settings
        self.repository = repository or ModelRepository(settings.model_repository)
        #: What this worker serves; replaced whole (``swap``), never changed in place.
        self.table: ModelTable = EMPTY_TABLE
        #: The one engine that decides what is served, at start and under model control.
        self.planner = Planner(settings, self.repository)
        #: Canary and shadow traffic between versions (SERVING_TRAFFIC, the admin API).
        self.traffic = Traffic(settings)
        self.planner.required = self.traffic.required
        #: Serialises loads and table swaps (the first request's lazy load, model control's
        #: reconcile).
        self.load_lock = threading.RLock()
        self._timeout_s = settings.request_timeout_ms / 1000.0
        self._max_client_timeout_s = (
            settings.max_client_timeout_ms or settings.request_timeout_ms
        ) / 1000.0
        #: Requests this worker is serving now; the app counts them in batched mode.
        self.in_flight = InFlight()
        self._body_limit: tuple[object, int] = (None, 0)
        #: With SERVING_MODEL_POOL, this worker's connections to the pool's processes.
        self._pool: PoolClient | None = None

    # -- the table, read once ----------------------------------------------------------------------
    @property
    def served(self) -> Mapping[Key, Served]:
        """Every served version: (name, version) -> (metadata, backend name), sorted."""
        return self.table.served

    @property
    def meta(self) -> ModelMetadata | None:
        """The default model (native API), known once ``resolve`` ran."""
        return self.table.meta

    @property
    def backend_name(self) -> str:
        return self.table.backend_name

    @property
    def failed(self) -> Mapping[Key, str]:
        """Versions left out because they failed their checks or their load: key -> reason."""
        return self.table.failed

    def swap(self, table: ModelTable) -> None:
        """Serve ``table`` from now on: one assignment (model control's only way to change what
        is served)."""
        self.table = table

    # -- start-up -------------------------------------------------------------------------------
    def resolve(self) -> ModelMetadata:
        """Plan every served version and check its files (no framework import; master-safe).

        Returns the default model's metadata; any selected version that fails its checks stops the
        start.
        """
        with self.load_lock:
            plan = self._strict_plan()
            if not self.table.loaded_here:
                self.table = ModelTable(plan.served, plan.default, plan.failed)
            meta = plan.served[plan.default][0]
        return meta

    def load(self, workers: int | None = None) -> None:
        """Load every served version in this process, capping math threads (idempotent,
        thread-safe)."""
        with self.load_lock:
            if self.table.loaded_here:
                return
            plan = self._strict_plan()
            workers = workers or self.settings.workers
            threads = self.settings.math_threads_for(workers)
            for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
                os.environ[variable] = str(threads)
            models: dict[Key, LoadedModel] = {}
            try:
                for key, (meta, backend_name) in plan.served.items():
                    models[key] = self.load_one(meta, backend_name, threads, workers)
            except BaseException:
                for model in models.values():
                    model.close()
                raise
            self.swap(ModelTable(plan.served, plan.default, plan.failed, models, os.getpid()))

    def _strict_plan(self) -> Plan:
        """The plan at start: any absent or refused version, or a traffic rule that does not fit
        what is served, stops it."""
        plan = self.planner.plan(strict=True)
        for rule in self.traffic.configured.values():
            check_rule(rule, plan.served)
        return plan

    def load_one(
        self, meta: ModelMetadata, backend_name: str, threads: int, workers: int
    ) -> LoadedModel:
        """Load, warm and start one version (its batcher thread in batched mode); not yet served."""
        started = time.perf_counter()
        backend = self._backend(meta, backend_name, threads)
        self._check_sample(backend, meta)
        model = LoadedModel(meta, backend_name, backend, self.settings, self.in_flight)
        model.load_seconds = time.perf_counter() - started
        model.start()
        metrics.MODEL_LOAD_SECONDS.labels(model.label).set(model.load_seconds)
        metrics.MODEL_INFO.labels(
            meta.name, str(meta.version), backend_name, meta.framework, self.settings.mode
        ).set(1)
        s = self.settings
        log.info(
            "loaded model %s version %d with %s (%s) in %.2fs; math threads %d (workers %d, cores "
            "%d)%s",
            meta.name,
            meta.version,
            backend_name,
            backend.framework_version(),
            model.load_seconds,
            threads,
            workers,
            os.cpu_count() or 0,
            f"; batching: max_batch_size {s.max_batch_size}, max_delay_ms {s.max_delay_ms:g}, "
            "max_queue"
            f" {s.max_queue}, request_timeout_ms {s.request_timeout_ms}"
            if model.batcher
            else "",
        )
        return model

    def _backend(self, meta: ModelMetadata, backend_name: str, threads: int) -> Backend:
        """The version's loaded backend: the master's copy (loaded before fork, the artifact
        unchanged since), its framework in this process, or a call into the model pool."""
        if not self.settings.pool_processes:
            cls = backend_class(backend_name)
            try:
                return PRELOADED.pop(preload_key(cls, meta, threads))
            except (KeyError, OSError):
                backend = cls(meta, threads)
                backend.load()
                return backend
        if self._pool is None:
            widest = max(
                max(m.sample_size, len(m.labels)) for m, _ in self._planned().served.values()
            )
            self._pool = PoolClient(
                Path(self.settings.pool_dir),
                mapping_size(self.settings.max_batch, widest),
                self._max_client_timeout_s,
            )
        pooled = PooledBackend(meta, threads, self._pool)
        pooled.load()
        return pooled

    @staticmethod
    def _check_sample(backend: Backend, meta: ModelMetadata) -> None:
        """Run the built-in sample once: warms the model and catches a broken artifact at start."""
        data, _ = meta.sample()
        output = backend.predict(np.asarray(data, dtype=np.float32).reshape(1, *meta.input_shape))
        if output.shape != (1, len(meta.labels)):
            raise ModelLoadError(
                f"{meta.name}:{meta.version}: the model returned shape {output.shape} for one"
                " sample"
            )

    def close(self) -> None:
        """Answer everything queued, then stop the model threads (worker exit)."""
        table = self.table
        if table.loaded_here:
            for model in table.models.values():
                model.close()
        if self._pool is not None:
            self._pool.close()
        self.traffic.close()

    def batchers(self) -> list[MicroBatcher]:
        """The batchers of every model loaded in this process (batched mode; empty otherwise)."""
        table = self.table
        if not table.loaded_here:
            return []
        return [model.batcher for model in table.models.values() if model.batcher is not None]

    @property
    def body_limit(self) -> int:
        """The largest request body: ``SERVING_MAX_BODY_BYTES``, or derived from the largest served
        input.

        A JSON sample of H x W numbers takes at most ~24 bytes a value (a float's shortest repr and
        a comma), so the cap admits a full batch with room to spare and nothing near the 50-100x of
        a fixed 2 MiB cap on 8x8 inputs; binary v2 and image bodies are far smaller than their JSON.
        """
        if self.settings.max_body_bytes:
            return self.settings.max_body_bytes
        served = self._planned().served
        if self._body_limit[0] is not served:  # computed once per model table, not per request
            pixels = max(meta.sample_size for meta, _ in served.values())
            self._body_limit = (
                served,
                max(
                    MIN_BODY_LIMIT,
                    BODY_ENVELOPE + self.settings.max_batch * pixels * BYTES_PER_VALUE,
                ),
            )
        return self._body_limit[1]

    # -- requests -------------------------------------------------------------------------------
    @property
    def default_label(self) -> str:
        """The default model as logs label it, ``name:version`` ("-" until it is resolved)."""
        return self.table.default_label

    @property
    def ready(self) -> bool:
        """True when this process has loaded every served model (and their model threads run)."""
        table = self.table
        return table.loaded_here and all(model.ready for model in table.models.values())

    def model_ready(self, name: str, version: int | None = None) -> bool:
        """Whether one served version is loaded and running here; ModelNotFound when not served."""
        table = self._planned()
        model = table.models.get(table.key(name, version)) if table.loaded_here else None
        return model is not None and model.ready

    def key(self, name: str, version: int | None = None) -> Key:
        """The served (name, version) a request addresses (latest served when ``version`` is
        None)."""
        return self._planned().key(name, version)

    def versions(self, name: str) -> list[int]:
        """The served versions of ``name``, ascending."""
        return self._planned().versions(name)

    def _planned(self) -> ModelTable:
        """The table, planned first when nothing was (an app used without gunicorn's hooks)."""
        table = self.table
        if table.default is not None:
            return table
        self._or_not_ready(self.resolve)
        return self.table

    @staticmethod
    def _or_not_ready(step: Callable[[], object]) -> None:
        """``step()`` (plan or load the models), or a 503 for the request when it cannot: the reason
        goes to the log, not to the client."""
        try:
            step()
        except (ModelLoadError, ConfigError) as exc:
            log.error("model not loaded: %s", exc)
            raise ModelNotReady(
                "the model is not loaded in this worker; see the server log"
            ) from None

    def model(self, name: str | None = None, version: int | None = None) -> LoadedModel:
        """A served model loaded in this process (default: the native API's), loading them on
        first use."""
        table = self.table
        if not table.loaded_here:
            self._or_not_ready(self.load)
            table = self.table
        key = (
            table.default
            if name is None and table.default is not None
            else table.key(name or "", version)
        )
        model = table.models.get(key)
        if model is None:  # not in this table's models: cannot happen for a served version
            raise ModelNotReady(f"model {key[0]}:{key[1]} is not loaded here; retry")
        return model

    def route(
        self, name: str | None = None, version: int | None = None, header: Header | None = None
    ) -> Route:
        """Who answers a request for ``name`` (default: the native API's model) and ``version``:
        that version when it names one; else, under a traffic rule for the model, the version the
        rule draws (``header`` reads the sticky header); else the latest served version."""
        if version is None and self.traffic.releases:
            table = self.table
            if not table.loaded_here:
                self._or_not_ready(self.load)
                table = self.table
            default = table.default[0] if table.default is not None else ""
            routed = self.traffic.route(table, name or default, header)
            if routed is not None:
                return routed
        return self.model(name, version)

    def answer(
        self, route: Route, batch: np.ndarray, timeout_s: float | None = None
    ) -> tuple[np.ndarray, LoadedModel]:
        """Probabilities for a validated batch from ``route``, and the version that answered,
        within ``timeout_s`` (clamped as ``predict`` clamps it)."""
        return route.answer(batch, self.timeout_for(timeout_s))

    def predict(
        self, batch: np.ndarray, timeout_s: float | None = None, model: LoadedModel | None = None
    ) -> np.ndarray:
        """Probabilities ``(N, classes)`` for a validated batch, within ``timeout_s`` (default: the
        setting).

        A client's deadline is clamped to ``SERVING_MAX_CLIENT_TIMEOUT_MS``.
        """
        return (model or self.model()).infer(batch, self.timeout_for(timeout_s))

    def timeout_for(self, client_timeout_s: float | None) -> float:
        """A request's time budget in seconds: the client's own (``X-Request-Timeout-Ms``, clamped
        to ``SERVING_MAX_CLIENT_TIMEOUT_MS``), else ``SERVING_REQUEST_TIMEOUT_MS``."""
        if client_timeout_s:
            return min(client_timeout_s, self._max_client_timeout_s)
        return self._timeout_s

    def labels_for(self, probabilities: np.ndarray) -> list[str]:
        """The default model's label of the most probable class for each row."""
        return self.model().labels_for(probabilities)

    def index(self, unserved: bool = False) -> list[dict[str, str]]:
        """Every served model version with its state here (READY or LOADING); with ``unserved``
        (operators only) also the repository's other versions, as UNAVAILABLE."""
        table = self._planned()
        entries = []
        for name, version in self.repository.index():
            entry = {"name": name, "version": str(version)}
            if (name, version) not in table.served:
                if not unserved and (name, version) not in table.failed:
                    continue
                reason = table.failed.get(
                    (name, version), "not selected by SERVING_MODELS or the version policy"
                )
                entry.update(state="UNAVAILABLE", reason=reason)
            else:
                model = table.models.get((name, version)) if table.loaded_here else None
                ready = model is not None and model.ready
                entry.update(
                    state="READY" if ready else "LOADING", reason="" if ready else "not loaded yet"
                )
            entries.append(entry)
        return entries
