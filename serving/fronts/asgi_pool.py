"""``RequestPool``: the bounded thread pool where the ASGI front runs handlers, never on the event
loop.

# design: handlers are plain blocking functions (decode, validate, call the model, encode), shared
# with the WSGI app. The event loop only parses HTTP, reads bodies and writes answers; each handler
# runs in one of ``threads`` pool threads (SERVING_THREADS as the mode sets it: 1 in process mode,
# so one model call at a time per worker, 4 threaded, 16 batched). At most ``max_waiting`` more
# requests wait for a thread; the next one is refused at once with the batcher's own 503
# (``QueueFull``, Retry-After), so an overloaded worker answers fast instead of queueing without
# bound in the executor.
#
# A sync worker cuts a hung model call at the request deadline with SIGALRM, and gunicorn kills a
# worker that stops heartbeating. Neither reaches a pool thread: the event loop keeps heartbeating.
# So the front stops waiting at ``backstop_s`` (the longest deadline a request may have, plus a
# margin) and answers 504, and a watchdog thread stops the worker gracefully (SIGTERM; the master
# starts a fresh one) once a call has run past gunicorn's ``timeout``, as ``lifecycle.HangWatchdog``
# does for batcher threads.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from serving.errors import DeadlineExceeded, QueueFull

log = logging.getLogger("serving")
T = TypeVar("T")
#: How long past the longest request deadline the front waits for a handler before answering 504
#: itself.
BACKSTOP_MARGIN_S = 0.1
Job = tuple[Callable[..., Any], tuple[Any, ...], asyncio.AbstractEventLoop, "asyncio.Future[Any]"]


class RequestPool:
    """A per-process pool of daemon threads with a bounded wait line, a backstop deadline and a hang
    watchdog.

    Daemon threads, not a ``ThreadPoolExecutor``: the executor joins its threads at interpreter
    exit, so a worker stopping because a call hung would wait for that call before it could exit.
    """

    def __init__(
        self, threads: int, max_waiting: int, backstop_s: float, hang_limit_s: float
    ) -> None:
        self.threads = threads
        self.max_waiting = max_waiting
        self.backstop_s = backstop_s + BACKSTOP_MARGIN_S
        self.hang_limit_s = hang_limit_s
        # requests running or waiting for a thread (touched on the event loop only)
        self.admitted = 0
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._pid = 0
        self._started: dict[int, float] = {}  # thread id -> monotonic start of the call it runs

    def _start(self) -> None:
        """Start the threads in the process that uses them (after fork)."""
        self._pid = os.getpid()
        self._jobs, self._started = queue.SimpleQueue(), {}
        for number in range(self.threads):
            threading.Thread(target=self._work, name=f"request-{number}", daemon=True).start()
        threading.Thread(target=self._watch, name="pool-watchdog", daemon=True).start()

    async def run(self, call: Callable[..., T], *args: Any) -> T:
        """``call(*args)`` in a pool thread; 503 when the wait line is full, 504 past the
        backstop."""
        if self.admitted >= self.threads + self.max_waiting:
            raise QueueFull(
                f"the request queue is full ({self.max_waiting} waiting for a thread); retry "
                "shortly"
            )
        if self._pid != os.getpid():
            self._start()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        # freed when the thread is done with it (_settle), not when the front stops waiting
        self.admitted += 1
        self._jobs.put((call, args, loop, future))
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.backstop_s)
        except TimeoutError:
            raise DeadlineExceeded(
                "no answer within the longest request deadline; the call is still running"
                " (a hung model: the worker restarts)"
            ) from None

    def _work(self) -> None:
        ident = threading.get_ident()
        while (job := self._jobs.get()) is not None:
            call, args, loop, future = job
            self._started[ident] = time.monotonic()
            try:
                outcome: tuple[Any, BaseException | None] = (call(*args), None)
            except BaseException as error:  # handed to the waiting coroutine, which renders it
                outcome = (None, error)
            finally:
                del self._started[ident]
            try:
                loop.call_soon_threadsafe(self._settle, future, *outcome)
            except RuntimeError:  # the loop is closed: the worker is exiting
                return

    def _settle(
        self, future: asyncio.Future[Any], result: Any, error: BaseException | None
    ) -> None:
        self.admitted -= 1
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def busy_seconds(self) -> float:
        """How long the oldest call in progress has been running (0 when idle)."""
        started = list(self._started.values())
        return time.monotonic() - min(started) if started else 0.0

    def _watch(self) -> None:
        pid = os.getpid()
        while True:
            time.sleep(min(1.0, self.hang_limit_s / 4))
            if self.busy_seconds() > self.hang_limit_s:
                log.error(
                    "worker %d: a request has run for over %.0fs in a pool thread; restarting the "
                    "worker",
                    pid,
                    self.hang_limit_s,
                )
                os.kill(pid, signal.SIGTERM)
                return

    def shutdown(self) -> None:
        """Stop the threads once they finish what they run (lifespan shutdown); a hung one is
        left behind."""
        if self._pid == os.getpid():
            for _ in range(self.threads):
                self._jobs.put(None)
