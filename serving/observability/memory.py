"""What the server's processes cost in memory, read from ``/proc/<pid>/smaps_rollup``.

RSS counts a shared page once in every process that maps it, so summing RSS over gunicorn's master
and workers counts a framework imported before fork once per worker. PSS (proportional set size)
splits each shared page between the processes sharing it, so the sum over every process is what the
server costs; USS (the private pages) is what one more process of its kind would add. The
benchmark (bench/memory.py) and the ``serving_process_memory_bytes`` gauge read the same figures
here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

PROC = Path("/proc")
#: The smaps_rollup fields summed, in kB: Rss, Pss, and the private pages that make the USS.
_FIELDS = {"Rss:": "rss", "Pss:": "pss", "Private_Clean:": "uss", "Private_Dirty:": "uss"}


@dataclass(frozen=True)
class ProcessMemory:
    """One process's resident memory in bytes: RSS, PSS and USS (private)."""

    pid: int
    rss: int
    pss: int
    uss: int
    #: master, worker, pool-arbiter (gunicorn's dirty arbiter) or pool (a model pool process)
    role: str = "server"


def process_memory(pid: int) -> ProcessMemory | None:
    """The memory of ``pid``, or None when it is gone or unreadable (another user's process)."""
    totals = {"rss": 0, "pss": 0, "uss": 0}
    try:
        text = (PROC / str(pid) / "smaps_rollup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        field = _FIELDS.get(name)
        if field is not None:
            totals[field] += int(rest.split()[0]) * 1024
    return ProcessMemory(pid, totals["rss"], totals["pss"], totals["uss"])


def children(pid: int) -> list[int]:
    """The direct children of ``pid``, from /proc's children list."""
    try:
        return [
            int(c) for c in (PROC / str(pid) / "task" / str(pid) / "children").read_text().split()
        ]
    except OSError:
        return []


def tree_memory(root: int) -> list[ProcessMemory]:
    """``root`` (a gunicorn master) and every process below it that could be read, with roles:
    its children are workers, except the one with children of its own (the model pool's
    arbiter), whose children are the pool's processes."""
    found: list[tuple[int, str]] = [(root, "master")]
    for child in children(root):
        grandchildren = children(child)
        found.append((child, "pool-arbiter" if grandchildren else "worker"))
        found.extend((pid, "pool") for pid in grandchildren)
    result = []
    for pid, role in found:
        memory = process_memory(pid)
        if memory is not None:
            result.append(replace(memory, role=role))
    return result


#: The server's root process, as a worker knows it (gunicorn's master); None outside gunicorn.
_root: int | None = None


def set_server_root(pid: int) -> None:
    """Report the tree under ``pid`` (called in each worker with its master's pid)."""
    global _root
    _root = pid


def server_memory() -> list[ProcessMemory]:
    """The whole server's processes (master, workers, model pool), or this process alone."""
    if _root is None:
        own = process_memory(os.getpid())
        return [] if own is None else [own]
    return tree_memory(_root)
