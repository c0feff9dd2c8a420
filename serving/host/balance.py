"""Connections spread evenly over the workers (``SERVING_BALANCE_CONNECTIONS``, gthread workers).

# design: every worker accepts from the one listening socket the master opened, and whichever
# worker calls ``accept`` first gets the connection. Keep-alive connections then stay with that
# worker for their whole life, so a burst of new connections (a load generator's, a proxy's
# upstream pool) is split by chance: on the 2-core VM of reports/balance-*.md, 32 connections
# landed 3/29, 7/25 and 8/24 in some runs, and a worker holding most of them serves them on one
# core (its GIL) while the other core idles: 15-25% fewer requests/s than an even split.
#
# The master maps a small shared array before the first fork, one slot per live worker (its
# connection count, -1 for a free slot). ``pre_fork`` gives each new worker the lowest free slot
# and ``child_exit`` frees it. A worker publishes its count on every pass of its event loop
# (gunicorn's ``notify``), and before it accepts a connection it compares its count with the
# other live workers': when it holds more than the least loaded one, it waits ``YIELD_S`` first,
# so that worker (woken by the same connection, since every worker polls the socket) takes it;
# if nobody has taken it by then, it accepts it itself. A worker never refuses a connection, and
# waits at most ``YIELD_S`` per connection while it holds more than its share.
"""

from __future__ import annotations

import mmap
import time
from typing import Any

#: Most workers counted at once (more get no slot, and accept as gunicorn does).
SLOTS = 256
#: How long a worker holding more connections than another waits before accepting one itself.
YIELD_S = 0.001
#: The attribute of a gunicorn worker object that holds its slot (set in the master).
ATTRIBUTE = "serving_balance_slot"

_memory: mmap.mmap | None = None
_counts: memoryview | None = None


def prepare() -> None:
    """Master, before the first fork: the shared array, every slot free."""
    global _memory, _counts
    if _counts is not None:
        return
    _memory = mmap.mmap(-1, 4 * SLOTS)  # anonymous and shared: every forked worker sees it
    _counts = memoryview(_memory).cast("i")
    for slot in range(SLOTS):
        _counts[slot] = -1


def assign(server: Any, worker: Any) -> None:
    """Master, before a worker's fork: the lowest slot no live worker holds."""
    if _counts is None:
        return
    taken = {getattr(live, ATTRIBUTE, None) for live in server.WORKERS.values()}
    free = next((slot for slot in range(SLOTS) if slot not in taken), None)
    setattr(worker, ATTRIBUTE, free)
    if free is not None:
        _counts[free] = 0


def release(worker: Any) -> None:
    """Master, when a worker has exited: its slot is free and counts for nobody."""
    slot = getattr(worker, ATTRIBUTE, None)
    if _counts is not None and slot is not None:
        _counts[slot] = -1


def publish(slot: int | None, connections: int) -> None:
    """Worker: its current number of connections."""
    if _counts is not None and slot is not None:
        _counts[slot] = connections


def crowded(slot: int | None, connections: int) -> bool:
    """Worker: whether another live worker holds fewer connections than ``connections``."""
    if _counts is None or slot is None:
        return False
    _counts[slot] = connections
    counts = _counts
    return any(0 <= counts[other] < connections for other in range(SLOTS) if other != slot)


def yield_to_others(slot: int | None, connections: int) -> None:
    """Worker, about to accept: first give a less loaded worker ``YIELD_S`` to take it."""
    if crowded(slot, connections):
        time.sleep(YIELD_S)
