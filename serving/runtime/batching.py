"""Dynamic micro-batching: many request threads, one model thread, one bounded queue.

# design: request threads never touch the model. ``submit`` puts a ``Pending`` on a bounded queue
# (``put_nowait``: a full queue answers 503 at once, it never blocks) and waits on the pending's
# event until its deadline. The model thread takes the first pending, then keeps collecting until
# the batch holds ``max_batch_size`` samples or ``max_delay_ms`` have passed since that *first*
# request arrived (one deadline per batch, never reset per item); with ``max_delay_ms=0`` it only
# takes what is already queued. Requests are never split: one that would overflow the batch starts
# the next batch instead; only a request larger than ``max_batch_size`` on its own runs in chunks of
# ``max_batch_size``. A request whose deadline passed while queued is answered 504 without running
# the model. A failing batch hands its exception to every waiter in it, and the thread keeps going.
# ``stop`` refuses new work, lets the thread drain everything queued, then joins it.
#
# Two request sides share the queue and the model thread: ``submit`` blocks its thread on an event
# (the WSGI app's request threads, the ASGI front's pool), ``submit_async`` awaits an asyncio future
# that the model thread resolves with ``call_soon_threadsafe`` (the ASGI front, through
# ``serving.fronts.suspend``), so a request waiting for its batch blocks neither a thread nor the
# event loop. Both get the same 503 when the queue is full and the same 504 at their deadline.
#
# Waiting only pays when more requests are on their way. Given ``in_flight`` (requests the worker
# is serving right now), the thread stops collecting as soon as every in-flight request is already
# in the batch or the queue: a lone client never waits ``max_delay_ms`` for company that cannot
# come, while under load the batch fills during the wait (and during the previous batch's model
# call).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from serving.errors import (
    DeadlineExceeded,
    InferenceError,
    QueueFull,
    ServiceStopping,
    ServingError,
)

log = logging.getLogger("serving.runtime.batching")
Predict = Callable[[np.ndarray], np.ndarray]
#: Extra time a waiter gives the model thread beyond its deadline, to pick up a result in flight.
WAIT_MARGIN_S = 0.05


@dataclass(eq=False)
class Pending:
    """One request waiting for its slice of a batch."""

    batch: np.ndarray
    deadline: float  # time.monotonic() by which the answer is useless
    # wakes the waiter: an event's ``set``, or a future's resolution on its loop
    notify: Callable[[], object]
    enqueued: float = field(default_factory=time.monotonic)
    result: np.ndarray | None = None
    error: BaseException | None = None

    def finish(self, result: np.ndarray | None = None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        try:
            self.notify()
        except RuntimeError:  # an asyncio waiter whose event loop is closed: its worker is exiting
            pass

    def outcome(self) -> np.ndarray:
        """The result, or the error raised (once finished)."""
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


@dataclass
class BatchStats:
    """What the model thread reports after each batch (for metrics and tests)."""

    requests: int
    samples: int
    seconds: float
    #: Seconds the batch's requests waited in the queue, summed over them.
    queued: float = 0.0


class MicroBatcher:
    """Collects concurrent requests into batches for one model, run by one dedicated thread."""

    #: What a queued request is (``serving.runtime.instruments.TracedBatcher`` adds its context).
    pending_type: type[Pending] = Pending

    def __init__(
        self,
        predict: Predict,
        max_batch_size: int,
        max_delay_ms: float,
        max_queue: int,
        name: str = "model",
        on_batch: Callable[[BatchStats], None] | None = None,
        on_expired: Callable[[], None] | None = None,
        in_flight: Callable[[], int] | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_delay_ms < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1, max_delay_ms >= 0")
        self._predict = predict
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_ms / 1000.0
        self._queue: queue.Queue[Pending] = queue.Queue(maxsize=max_queue)
        self._carry: Pending | None = None  # taken from the queue but did not fit the last batch
        self._on_batch = on_batch
        self._on_expired = on_expired
        self._in_flight = in_flight
        self._accepting = False
        self._stop = threading.Event()
        self._busy_since: float | None = None  # monotonic start of the model call in progress
        self._thread = threading.Thread(target=self._run, name=f"batcher-{name}", daemon=True)

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the model thread; ``submit`` is accepted from now on."""
        self._accepting = True
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and self._accepting

    def depth(self) -> int:
        """Requests waiting in the queue (not counting the batch being run)."""
        return self._queue.qsize() + (1 if self._carry is not None else 0)

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new requests, run everything already queued, then stop the thread."""
        self._accepting = False
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- request side ---------------------------------------------------------------------------
    def submit(self, batch: np.ndarray, timeout_s: float) -> np.ndarray:
        """The model's output for ``batch``; QueueFull (503) at once, DeadlineExceeded (504) in
        time."""
        done = threading.Event()
        pending = self._enqueue(batch, timeout_s, done.set)
        if not done.wait(timeout_s + WAIT_MARGIN_S):
            raise _late(timeout_s)
        return pending.outcome()

    async def submit_async(self, batch: np.ndarray, timeout_s: float) -> np.ndarray:
        """``submit`` for a coroutine: the same answers, awaiting a future instead of blocking a
        thread."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        pending = self._enqueue(
            batch, timeout_s, partial(loop.call_soon_threadsafe, _resolve, done)
        )
        timer = loop.call_later(timeout_s + WAIT_MARGIN_S, _expire, done, timeout_s)
        try:
            await done
        finally:
            timer.cancel()
        return pending.outcome()

    def _enqueue(
        self, batch: np.ndarray, timeout_s: float, notify: Callable[[], object]
    ) -> Pending:
        if not self._accepting:
            raise ServiceStopping("the server is shutting down; retry on another instance")
        pending = self.pending_type(batch, time.monotonic() + timeout_s, notify)
        try:
            self._queue.put_nowait(pending)
        except queue.Full:
            raise QueueFull(
                f"the request queue is full ({self._queue.maxsize} waiting); retry shortly"
            ) from None
        return pending

    # -- model thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            first = self._next(block_s=0.05)
            if first is None:
                if self._stop.is_set() and self._queue.empty():
                    return
                continue
            items = self._collect(first)
            if items:
                self._execute(items)

    def _next(self, block_s: float) -> Pending | None:
        """The carried-over request, else the next queued one (waiting at most ``block_s``)."""
        if self._carry is not None:
            item, self._carry = self._carry, None
            return item
        try:
            return self._queue.get(timeout=block_s) if block_s > 0 else self._queue.get_nowait()
        except queue.Empty:
            return None

    def _collect(self, first: Pending) -> list[Pending]:
        """Build one batch starting at ``first``: one deadline, ``max_batch_size`` samples at
        most."""
        items: list[Pending] = []
        samples = 0
        close_at = first.enqueued + self.max_delay_s  # measured from the first request's arrival
        candidate: Pending | None = first
        while candidate is not None:
            if self._expired(candidate):
                pass
            elif items and samples + len(candidate.batch) > self.max_batch_size:
                self._carry = candidate  # never split: it opens the next batch
                break
            else:
                items.append(candidate)
                samples += len(candidate.batch)
                if samples >= self.max_batch_size:
                    break
            candidate = self._next(block_s=0)
            if candidate is None and self._more_coming(len(items)):
                candidate = self._next(block_s=close_at - time.monotonic())
        return items

    def _more_coming(self, collected: int) -> bool:
        """Whether some in-flight request is neither in this batch nor queued (so may still
        arrive)."""
        if self._in_flight is None:
            return True
        return self._in_flight() > collected + self._queue.qsize()

    def _expired(self, item: Pending) -> bool:
        if time.monotonic() < item.deadline:
            return False
        item.finish(
            error=DeadlineExceeded("the request deadline passed while it waited in the queue")
        )
        if self._on_expired:
            self._on_expired()
        return True

    def busy_seconds(self) -> float:
        """How long the model call in progress has been running (0 when idle): a hang detector."""
        since = self._busy_since
        return 0.0 if since is None else time.monotonic() - since

    def _execute(self, items: list[Pending]) -> None:
        started = time.perf_counter()
        self._busy_since = now = time.monotonic()
        try:
            self._call(items, started, sum(now - item.enqueued for item in items))
        finally:
            self._busy_since = None

    def _call(self, items: list[Pending], started: float, queued: float = 0.0) -> None:
        try:
            joined = (
                np.concatenate([item.batch for item in items]) if len(items) > 1 else items[0].batch
            )
            outputs = [
                self._predict(joined[i : i + self.max_batch_size])
                for i in range(0, len(joined), self.max_batch_size)
            ]
            output = outputs[0] if len(outputs) == 1 else np.concatenate(outputs)
        except ServingError as exc:
            for item in items:
                item.finish(error=exc)
            return
        # the model failed: every waiter gets the error, the thread lives on
        except Exception as exc:
            log.exception("batch of %d requests failed", len(items))
            error = InferenceError(
                f"inference failed for a batch ({exc.__class__.__name__}); see the server log"
            )
            for item in items:
                item.finish(error=error)
            return
        offset = 0
        for item in items:
            size = len(item.batch)
            item.finish(result=output[offset : offset + size])
            offset += size
        if self._on_batch:
            self._on_batch(
                BatchStats(len(items), len(joined), time.perf_counter() - started, queued)
            )


def _late(timeout_s: float) -> DeadlineExceeded:
    return DeadlineExceeded(f"no answer within the request deadline of {timeout_s * 1000:.0f} ms")


def _resolve(done: asyncio.Future[None]) -> None:
    """Wake a ``submit_async`` waiter (on its loop): the pending's outcome is set."""
    if not done.done():
        done.set_result(None)


def _expire(done: asyncio.Future[None], timeout_s: float) -> None:
    """Wake a ``submit_async`` waiter whose deadline passed first, with the 504."""
    if not done.done():
        done.set_exception(_late(timeout_s))


class InFlight:
    """A thread-safe count of the requests a worker is serving (the batcher's ``in_flight``)."""

    def __init__(self) -> None:
        self._count = 0
        self._lock = threading.Lock()

    def enter(self) -> None:
        with self._lock:
            self._count += 1

    def leave(self) -> None:
        with self._lock:
            self._count -= 1

    def __call__(self) -> int:
        return self._count
