"""How a request waits for its model call: chosen by the front or the host that runs it, never asked
by the runtime.

# design: a model call either goes through the model's batcher (batched mode) or calls the backend
# directly. How the calling request waits meanwhile depends on what runs it: a request thread blocks
# (gthread workers, the ASGI front's pool); a handler running in a greenlet on the ASGI event loop
# parks there until the batcher resolves its future (``serving.fronts.suspend``); a sync worker
# serves requests on its main thread, where a direct call is bounded by the request deadline with
# SIGALRM. Each is a ``Waiter``, set for the requests it concerns in a context variable (``WAITER``)
# by whoever starts them: the ASGI front for its greenlets, the gunicorn hooks for a sync worker's
# main thread. ``LoadedModel`` calls ``WAITER.get()`` and does what it says; it never inspects its
# caller.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

import numpy as np

from serving.errors import DeadlineExceeded
from serving.runtime.batching import MicroBatcher

Call = Callable[[np.ndarray], np.ndarray]


class Waiter:
    """A request thread: it blocks until its batch is answered, and a direct call runs unbounded
    (the pool or gunicorn's heartbeat is its backstop)."""

    def batched(self, batcher: MicroBatcher, batch: np.ndarray, timeout_s: float) -> np.ndarray:
        return batcher.submit(batch, timeout_s)

    def direct(self, call: Call, batch: np.ndarray, timeout_s: float) -> np.ndarray:
        return call(batch)


class AlarmWaiter(Waiter):
    """A sync worker's main thread: a direct call is cut at the request deadline by SIGALRM, so a
    model call that overruns answers 504 JSON as soon as control comes back to Python (gunicorn's
    ``timeout`` stays the backstop for a call stuck in C code). The handler is installed once per
    process."""

    def __init__(self) -> None:
        self._pid = 0  # the process that installed the handler

    def direct(self, call: Call, batch: np.ndarray, timeout_s: float) -> np.ndarray:
        # signal.getsignal costs ~8 us (an enum lookup); this check does not
        if self._pid != os.getpid():
            signal.signal(signal.SIGALRM, _raise_deadline)
            self._pid = os.getpid()
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            return call(batch)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)


def _raise_deadline(_signum: int, _frame: Any) -> None:
    raise DeadlineExceeded("no answer within the request deadline; the model call was cut short")


THREAD = Waiter()
ALARM = AlarmWaiter()
#: How the request running in this context waits (a thread's by default).
WAITER: ContextVar[Waiter] = ContextVar("serving_waiter", default=THREAD)
