"""One model version loaded in a worker: its backend, its call lock and, in batched mode, its
batcher.

# design: ``run`` is the only place a backend is called. In batched mode the model's
# ``MicroBatcher`` thread is its only caller; otherwise request threads call it directly, and a
# backend that is not thread-safe gets a lock so even a misconfigured server serialises its calls.
# Metrics are labelled ``name:version``, so every served model version has its own latency, batch
# size and queue depth. Batching attaches by wrapping: in batched mode ``infer`` is bound to the
# batched call at construction, otherwise to the direct one; how the caller waits for either is the
# ``Waiter`` its front set (``serving.runtime.waiting``: a blocking thread, a greenlet on the ASGI
# event loop, SIGALRM on a sync worker's main thread), never a question this module asks.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol

import numpy as np

from serving.backends import Backend
from serving.config import Settings
from serving.errors import InferenceError, ServingError
from serving.observability import metrics
from serving.runtime import instruments
from serving.runtime.batching import BatchStats, InFlight, MicroBatcher
from serving.runtime.waiting import WAITER
from serving.store.repository import ModelMetadata

log = logging.getLogger("serving")


class LoadedModel:
    """One model version loaded in this worker: its backend and, in batched mode, its batcher."""

    def __init__(
        self,
        meta: ModelMetadata,
        backend_name: str,
        backend: Backend,
        settings: Settings,
        in_flight: InFlight | None = None,
    ) -> None:
        self.meta = meta
        self.backend_name = backend_name
        self.backend = backend
        self.load_seconds = 0.0
        self._call_lock: AbstractContextManager[Any] = (
            nullcontext() if backend.thread_safe else threading.Lock()
        )
        self.label = f"{meta.name}:{meta.version}"
        self._latency = metrics.INFERENCE_LATENCY.labels(self.label)
        self._batch_sizes = metrics.BATCH_SIZE.labels(self.label)
        self._depth = metrics.QUEUE_DEPTH.labels(self.label)
        self._queued = metrics.QUEUE_SECONDS.labels(self.label)
        self._requests = metrics.ModelRequests(self.label)
        self.batcher: MicroBatcher | None = None
        # requests inside ``infer`` now: a retired version waits for them (model control only)
        self._users = 0
        self._users_lock = threading.Lock()
        # no switch can happen: no lock per request
        self._count_users = settings.model_control != "none"
        self._call = self._direct
        if backend.name == "pool":  # its pool process counts the batches and the model's time
            self._pool_calls = metrics.POOL_CALL_SECONDS.labels(self.label)
            self._call = self._pooled
        # tracing, payload logs and drift attach by wrapping (nothing changes when they are off)
        self.run = instruments.wrap_run(self, settings)  # type: ignore[method-assign]
        if settings.mode == "batched":
            self.batcher = instruments.batcher_class(settings)(
                self.run,
                settings.max_batch_size,
                settings.max_delay_ms,
                settings.max_queue,
                name=self.label,
                on_batch=self._observe_batch,
                in_flight=in_flight,
            )
            self._call = self._batched
        self._call = instruments.wrap_call(self, settings, self._call)

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
        except ServingError:
            raise
        except Exception:
            log.exception("inference failed for a batch of %d on %s", len(batch), self.label)
            raise InferenceError("inference failed; the error is in the server log") from None
        if output.shape != (len(batch), len(self.meta.labels)):
            log.error(
                "%s returned shape %s for a batch of %d", self.label, output.shape, len(batch)
            )
            raise InferenceError("the model returned an output of the wrong shape")
        return output

    def infer(self, batch: np.ndarray, timeout_s: float) -> np.ndarray:
        """Probabilities for ``batch``: through the batcher in batched mode, else a direct call,
        as the caller's ``Waiter`` waits; counted while model control may retire this version, and
        in the version's request counts (its outcome and time, queue included)."""
        started = time.perf_counter()
        try:
            if not self._count_users:
                output = self._call(batch, timeout_s)
            else:
                with self._users_lock:
                    self._users += 1
                try:
                    output = self._call(batch, timeout_s)
                finally:
                    with self._users_lock:
                        self._users -= 1
        except ServingError as error:
            outcome = "refused" if error.status_code == 503 else "error"
            self._requests.observe(outcome, time.perf_counter() - started)
            raise
        except BaseException:
            self._requests.observe("error", time.perf_counter() - started)
            raise
        self._requests.observe("ok", time.perf_counter() - started)
        return output

    def answer(self, batch: np.ndarray, timeout_s: float) -> tuple[np.ndarray, LoadedModel]:
        """``infer``, and this version as the one that answered (the data plane's ``Route``; a
        routed request's may be another version, ``serving.runtime.traffic.Routed``)."""
        return self.infer(batch, timeout_s), self

    def _batched(self, batch: np.ndarray, timeout_s: float) -> np.ndarray:
        batcher = self.batcher
        assert batcher is not None
        self._depth.set(batcher.depth() + 1)
        try:
            return WAITER.get().batched(batcher, batch, timeout_s)
        finally:
            self._depth.set(batcher.depth())

    def _direct(self, batch: np.ndarray, timeout_s: float) -> np.ndarray:
        started = time.perf_counter()
        output = WAITER.get().direct(self.run, batch, timeout_s)
        metrics.TALLY.observe(self._latency, time.perf_counter() - started)
        metrics.TALLY.observe(self._batch_sizes, len(batch))
        return output

    def _pooled(self, batch: np.ndarray, timeout_s: float) -> np.ndarray:
        started = time.perf_counter()
        output = WAITER.get().direct(self.run, batch, timeout_s)
        metrics.TALLY.observe(self._pool_calls, time.perf_counter() - started)
        return output

    def labels_for(self, probabilities: np.ndarray) -> list[str]:
        """The label of the most probable class for each row."""
        labels = self.meta.labels
        return [labels[i] for i in probabilities.argmax(axis=1).tolist()]

    def _observe_batch(self, stats: BatchStats) -> None:
        metrics.TALLY.observe(self._latency, stats.seconds)
        metrics.TALLY.observe(self._batch_sizes, stats.samples)
        metrics.TALLY.inc(self._queued, stats.queued)

    def retire(self, limit_s: float) -> None:
        """Unload after a version switch: wait (up to ``limit_s``) until no request holds this
        version, then stop its batcher, which answers whatever is still queued first."""
        # a request that looked this version up just before the switch reaches ``infer``
        time.sleep(0.05)
        deadline = time.monotonic() + limit_s
        while self._users and time.monotonic() < deadline:
            time.sleep(0.01)
        self.close()
        log.info("unloaded %s (%d requests still in it)", self.label, self._users)

    def close(self) -> None:
        """Drain and stop the batcher (queued requests are answered first)."""
        if self.batcher is not None:
            self.batcher.stop()


class Route(Protocol):
    """Who answers one request: a ``LoadedModel``, or a version chosen by a traffic rule
    (``serving.runtime.traffic.Routed``). ``meta`` is the input contract to decode with."""

    @property
    def meta(self) -> ModelMetadata: ...

    @property
    def label(self) -> str: ...

    def answer(self, batch: np.ndarray, timeout_s: float) -> tuple[np.ndarray, LoadedModel]: ...
