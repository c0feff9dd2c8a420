"""Blocking handlers that wait for the batcher without holding a thread: ``run`` on the loop,
``wait`` inside.

# design: handlers are plain blocking functions shared with the WSGI app (decode, validate, call the
# model, encode). On the ASGI front in batched mode an inference handler runs in a greenlet on the
# event loop's thread (``run``): decoding and encoding a sample take tens of microseconds there, and
# when the handler reaches the model, the ``Waiter`` this module sets for it (``GREENLET``, in the
# greenlet's context: ``serving.runtime.waiting``) calls ``wait(batcher.submit_async(...))``, which
# switches back to the event loop with that awaitable. The
# loop serves other connections until the model thread resolves the request's asyncio future, then
# switches back into the handler with the result (or raises the batcher's 503/504 there). A request
# waiting for its batch so holds no thread, only a greenlet and its queue entry, and the batcher's
# bounded queue is its only admission limit. SQLAlchemy's asyncio layer does the same
# (``greenlet_spawn`` / ``await_only``). The greenlet runs in a copy of the caller's contextvars
# context, so the request id reaches its log records as from a pool thread.
"""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import greenlet
import numpy as np

from serving.runtime.batching import MicroBatcher
from serving.runtime.waiting import WAITER, Waiter

T = TypeVar("T")


class _Handler(greenlet.greenlet):  # type: ignore[misc]
    """A greenlet whose code may ``wait``: its parent is the event loop's task, which awaits for
    it."""


def suspended() -> bool:
    """Whether the calling code runs under ``run``, so it may ``wait`` instead of blocking its
    thread."""
    return isinstance(greenlet.getcurrent(), _Handler)


async def run(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``call(*args, **kwargs)`` on the event loop's thread, awaiting for it whatever it passes
    to ``wait``."""
    handler = _Handler(call)
    handler.gr_context = contextvars.copy_context()
    # the model call waits on the loop, not in a thread
    handler.gr_context.run(WAITER.set, GREENLET)
    step: Any = handler.switch(*args, **kwargs)
    while not handler.dead:  # ``step`` is an awaitable the handler waits for
        try:
            value = await step
        # raised inside the handler, where it is rendered or re-raised
        except BaseException as error:
            step = handler.throw(error)
        else:
            step = handler.switch(value)
    result: T = step
    return result


def wait(awaitable: Awaitable[T]) -> T:
    """From code under ``run``: the value of ``awaitable``, the event loop serving others
    meanwhile."""
    current = greenlet.getcurrent()
    if not isinstance(current, _Handler):
        if isinstance(awaitable, Coroutine):
            awaitable.close()  # never awaited: closed here rather than warned about at collection
        raise RuntimeError("suspend.wait outside suspend.run")
    value: T = current.parent.switch(awaitable)
    return value


class GreenletWaiter(Waiter):
    """A handler under ``run``: a batched call awaits the batcher's future on the event loop (no
    thread waits); a direct call runs where it is (the front sends only batched inference here)."""

    def batched(self, batcher: MicroBatcher, batch: np.ndarray, timeout_s: float) -> np.ndarray:
        return wait(batcher.submit_async(batch, timeout_s))


GREENLET = GreenletWaiter()
