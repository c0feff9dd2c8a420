"""Shadow traffic: a copy of a request sent to a candidate version, whose answer is compared, then
dropped.

# design: the request's thread puts a ``ShadowCopy`` (the batch, the stable version's answer and
# latency) on a bounded queue and goes on at once; a few shadow threads per worker (as many as it
# has request threads, so the candidate sees the same concurrency as the stable version) take the
# copies off and call the candidate the way a request would: its batcher in batched mode, a direct
# call otherwise, in a plain thread (never the request's SIGALRM or greenlet). A full queue drops
# the copy and counts it. So a shadow never delays, blocks or fails the request it copies; what it
# costs is CPU, which an operator sizes with the shadow percentage.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

log = logging.getLogger("serving")


class ShadowCopy(NamedTuple):
    """One request's copy for a candidate: what to send, what the stable version answered and how
    long it took, and who keeps the score (``compare(copy)``)."""

    compare: Callable[[ShadowCopy], None]
    model: Any  # the candidate's LoadedModel
    batch: np.ndarray
    answer: np.ndarray
    seconds: float
    timeout_s: float


class ShadowRunner:
    """A worker's shadow threads and their bounded queue (threads start with the first copy)."""

    def __init__(self, threads: int, capacity: int) -> None:
        self._queue: queue.Queue[ShadowCopy | None] = queue.Queue(capacity)
        self._wanted = max(1, threads)
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, copy: ShadowCopy) -> bool:
        """Queue a copy; False (dropped) when the queue is full or the worker is stopping."""
        if not self._threads:
            self._start()
        if self._closed:
            return False
        try:
            self._queue.put_nowait(copy)
        except queue.Full:
            return False
        return True

    def _start(self) -> None:
        with self._lock:
            while not self._closed and len(self._threads) < self._wanted:
                thread = threading.Thread(
                    target=self._run, name=f"shadow-{len(self._threads)}", daemon=True
                )
                thread.start()
                self._threads.append(thread)

    def _run(self) -> None:
        while True:
            copy = self._queue.get()
            if copy is None:
                return
            try:
                copy.compare(copy)
            except Exception:  # never let a shadow thread die: the next copy is compared
                log.exception("a shadow comparison failed")

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def close(self, timeout_s: float = 2.0) -> None:
        """Stop the threads (worker exit): copies not yet compared are dropped, the one being
        compared may finish; waits ``timeout_s`` at most."""
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass
        for _ in threads:
            try:
                self._queue.put(None, timeout=max(0.0, deadline - time.monotonic()))
            except queue.Full:
                break
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
