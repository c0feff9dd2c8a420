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
from collections.abc import Iterator
from dataclasses import dataclass
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


def descendants(pid: int) -> Iterator[int]:
    """Every process below ``pid`` (children first, then theirs), from /proc's children lists."""
    pending = [pid]
    while pending:
        parent = pending.pop(0)
        try:
            text = (PROC / str(parent) / "task" / str(parent) / "children").read_text()
        except OSError:
            continue
        for child in text.split():
            yield int(child)
            pending.append(int(child))


def tree_memory(root: int) -> list[ProcessMemory]:
    """``root`` (a gunicorn master) and every process below it, each one that could be read."""
    found = (process_memory(pid) for pid in (root, *descendants(root)))
    return [memory for memory in found if memory is not None]


#: The server's root process, as a worker knows it (gunicorn's master); None outside gunicorn.
_root: int | None = None


def set_server_root(pid: int) -> None:
    """Report the tree under ``pid`` (called in each worker with its master's pid)."""
    global _root
    _root = pid


def server_memory() -> list[ProcessMemory]:
    """The whole server's processes (master, workers, model pool), or this process alone."""
    return tree_memory(_root) if _root is not None else tree_memory(os.getpid())[:1]
