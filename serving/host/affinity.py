"""CPU affinity (``SERVING_CPU_AFFINITY``): each worker pinned to its own share of the server's
cores.

# design: the master splits the cores it may use (``os.sched_getaffinity``, which a container's
# cpuset already narrows) into blocks of ``cores // workers`` cores, one math thread each (the
# default of ``math_threads_for``), and gives each new worker the block with the fewest live
# workers (``pre_fork``, lowest first on a tie): a worker respawned after a crash or a
# ``max_requests`` recycle takes the block its predecessor left, the new workers of a SIGHUP spread
# as the old ones leave, and with more workers than cores several share one core. The worker pins
# itself in ``post_fork``, before it starts any thread, so every thread it starts later (the gRPC
# server's, the model thread, ONNX Runtime's intra-op pool) inherits the block. The master, the
# model pool's processes and any cores left over stay unpinned.
#
# Why: a worker's request crosses threads (gRPC: a completion-queue poller, then a handler thread,
# each woken by the other), and waking a thread on the other core is what costs: on the 2-core VM
# of reports/grpc-*.md a one-sample gRPC call at concurrency 1 took 0.50 ms unpinned and 0.34 ms
# pinned (perf_analyzer p50). It is off by default because pinning assumes the cores are this
# server's: two pinned servers on one machine both start at the first core (docs/operations.md).
"""

from __future__ import annotations

import os
from typing import Any

from serving.config import keep_server_cores

#: The attribute of a gunicorn worker object that holds its block of cores (set in the master).
ATTRIBUTE = "serving_cpus"


def blocks(cores: list[int], workers: int) -> list[tuple[int, ...]]:
    """The server's cores in blocks of ``cores // workers`` (at least one core each); cores left
    over when the blocks do not fill them stay unpinned."""
    size = max(1, len(cores) // max(1, workers))
    return [tuple(cores[i : i + size]) for i in range(0, len(cores) - size + 1, size)]


def choose(all_blocks: list[tuple[int, ...]], taken: list[tuple[int, ...]]) -> tuple[int, ...]:
    """The block with the fewest live workers on it; the first such block on a tie."""
    return min(all_blocks, key=lambda block: (taken.count(block), all_blocks.index(block)))


def assign(server: Any, worker: Any) -> None:
    """Master, before a worker's fork: give it the least-used block of the server's cores."""
    cores = sorted(os.sched_getaffinity(0))
    taken = [getattr(live, ATTRIBUTE, None) for live in server.WORKERS.values()]
    block = choose(blocks(cores, server.num_workers), [b for b in taken if b is not None])
    setattr(worker, ATTRIBUTE, block)
    # the worker's math threads are counted against the server's cores, not its block
    worker.serving_server_cores = len(cores)


def pin(worker: Any) -> None:
    """Worker, right after fork (no thread started yet): pin this process to its block."""
    block = getattr(worker, ATTRIBUTE, None)
    if block is None:
        return
    keep_server_cores(worker.serving_server_cores)
    os.sched_setaffinity(0, block)
    worker.log.debug("worker %d pinned to CPU %s", os.getpid(), ",".join(map(str, block)))
