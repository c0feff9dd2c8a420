"""One copy for every worker: what the gunicorn master imports before fork (SERVING_SHARE_MEMORY).

# design: gunicorn forks every worker from the master, so whatever the master holds at fork is
# shared copy-on-write by all of them: the first workers, those respawned after a crash or recycled
# by ``max_requests``, and those a SIGHUP starts. The master imports the served backends'
# frameworks and the front's modules (Flask, the serving package) but runs nothing: no model is
# called here, because a framework's thread pools started before fork hang the workers (the
# fork-safety table in docs/modes.md). Only a backend whose load starts no thread (ONNX Runtime
# with one math thread) loads its models here, and every worker serves that one copy; the others
# load their own model after fork.
#
# Two things keep the shared pages shared. The collector is frozen before each fork
# (``gc.freeze``), so a worker's collections never write to the frozen objects' headers, which
# would copy their pages. And the master gives back the library pages it read while importing
# (MADV_PAGEOUT on its read-only file mappings): it never runs that code, while the workers fault
# in, and share, the part they use; the pages stay in the page cache, clean.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import importlib
import os
import time
from typing import Any

from serving.backends import backend_class
from serving.backends.base import PRELOADED, preload_key
from serving.config import Settings
from serving.errors import ModelLoadError
from serving.runtime.service import InferenceService

#: madvise(2): reclaim these pages (Linux 5.4+); clean file pages leave this process's resident set.
MADV_PAGEOUT = 21


def share_before_fork(server: Any, settings: Settings) -> None:
    """Import what every worker would import on its own, once, in the master."""
    if not settings.share_memory:
        return
    started = time.monotonic()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    modules = ["serving.fronts.asgi" if settings.front == "asgi" else "serving.fronts.wsgi"]
    service = InferenceService(settings)
    service.resolve()
    if not settings.model_pool:  # with the pool, HTTP workers import no framework at all
        for backend in sorted({backend for _, backend in service.served.values()}):
            modules += backend_class(backend).framework_modules
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:  # the worker's own load says what is missing, with its reason
            server.log.warning(
                "cannot import %s before fork (%s): each worker imports it", name, exc
            )
    preloaded = preload_models(server, service, settings)
    freeze_before_fork()
    released = page_out_libraries()
    server.log.info(
        "shared by every worker: %s%s, made in the master in %.1fs (%d MB of library pages"
        " left to the workers)",
        ", ".join(modules),
        f"; loaded {', '.join(preloaded)}" if preloaded else "",
        time.monotonic() - started,
        released // 1_000_000,
    )


def preload_models(server: Any, service: InferenceService, settings: Settings) -> list[str]:
    """Load here the versions whose backend loads fork-safely (ONNX Runtime with one math thread),
    so that every worker serves the same copy of the weights; the others load in each worker."""
    if settings.model_pool:
        return []
    threads = settings.math_threads_for(server.cfg.workers)
    loaded = []
    for meta, backend_name in service.served.values():
        cls = backend_class(backend_name)
        if not cls.preloadable(threads):
            continue
        backend = cls(meta, threads)
        try:
            backend.load()
        except ModelLoadError as exc:  # the workers' own load reports it, and stops the start
            server.log.warning("cannot load %s:%d before fork: %s", meta.name, meta.version, exc)
            continue
        PRELOADED[preload_key(cls, meta, threads)] = backend
        loaded.append(f"{meta.name}:{meta.version}")
    return loaded


def freeze_before_fork() -> None:
    """Move everything the master holds out of the collector's reach, so that a worker's
    collections never write to (and so copy) the pages it shares with the master."""
    gc.collect()
    gc.freeze()


def page_out_libraries(maps_path: str = "/proc/self/maps") -> int:
    """Ask the kernel to drop this process's resident pages of read-only file mappings.

    Read-only mappings only: their pages are either clean copies of the file (re-read from the page
    cache if touched again) or relocated pages the kernel keeps, since pageout never discards
    data. Returns the bytes of the mappings advised (0 where madvise is not there).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    advised = 0
    with open(maps_path) as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) < 6 or "w" in fields[1] or not fields[5].startswith("/"):
                continue
            start, end = (int(part, 16) for part in fields[0].split("-"))
            if madvise(start, end - start, MADV_PAGEOUT) == 0:
                advised += end - start
    return advised
