"""serving.fronts.suspend: a blocking function run on the event loop awaits through ``wait`` without a thread."""

from __future__ import annotations

import asyncio
import contextvars
import threading

import pytest

from serving.fronts import suspend

REQUEST = contextvars.ContextVar("REQUEST", default="none")


def handler(delay_s: float, tag: str) -> tuple[str, str, bool, int]:
    """A blocking 'handler' that waits twice for the loop and reports what it saw."""
    assert suspend.suspended()
    first = suspend.wait(asyncio.sleep(delay_s, result=tag))
    ident = threading.get_ident()
    second = suspend.wait(asyncio.sleep(0, result=first.upper()))
    return second, REQUEST.get(), threading.get_ident() == ident, ident


def test_handlers_interleave_on_the_loop_thread_and_keep_their_context() -> None:
    async def one(tag: str, delay_s: float) -> tuple[str, str, bool, int]:
        REQUEST.set(tag)
        return await suspend.run(handler, delay_s, tag=tag)

    async def main() -> tuple[list[tuple[str, str, bool, int]], float, int]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        results = await asyncio.gather(*(one(f"r{i}", 0.2) for i in range(50)))
        return list(results), loop.time() - started, threading.get_ident()

    results, elapsed, loop_thread = asyncio.run(main())
    assert [r[0] for r in results] == [f"R{i}" for i in range(50)]
    assert [r[1] for r in results] == [f"r{i}" for i in range(50)], "each handler sees its own request"
    assert all(r[2] and r[3] == loop_thread for r in results), "handlers run on the loop's thread"
    assert elapsed < 1.0, f"50 handlers waiting 0.2 s each took {elapsed:.2f}s: they did not wait concurrently"
    assert not suspend.suspended()


def test_an_error_awaited_is_raised_in_the_handler_and_can_be_handled_there() -> None:
    async def fails() -> None:
        raise LookupError("from the loop")

    def catches() -> str:
        try:
            suspend.wait(fails())
        except LookupError as error:
            return f"caught {error}"
        return "not raised"

    def lets_it_through() -> None:
        suspend.wait(fails())

    assert asyncio.run(suspend.run(catches)) == "caught from the loop"
    with pytest.raises(LookupError):
        asyncio.run(suspend.run(lets_it_through))


def test_a_handler_that_never_waits_returns_at_once_and_wait_outside_run_is_refused() -> None:
    assert asyncio.run(suspend.run(lambda x: x * 2, 21)) == 42
    with pytest.raises(RuntimeError):
        suspend.wait(asyncio.sleep(0))
