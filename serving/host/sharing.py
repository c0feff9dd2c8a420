"""One copy for every worker: what the gunicorn master imports before fork (SERVING_SHARE_MEMORY).

# design: gunicorn forks every worker from the master, so whatever the master holds at fork is
# shared copy-on-write by all of them: the first workers, those respawned after a crash or recycled
# by ``max_requests``, and those a SIGHUP starts. The master imports the served backends'
# frameworks and the front's modules (Flask, the serving package) and builds the app (settings,
# routes, keys: what each worker built for itself before; again on SIGHUP) but runs nothing: no
# model is called here, because a framework's thread pools started before fork hang the workers (the
# fork-safety table in docs/modes.md). Only a backend whose load starts no thread and runs
# nothing (ONNX Runtime with one math thread, TorchScript) loads its models here, and every worker
# serves that one copy; the others load their own model after fork.
#
# Two things keep the shared pages shared. The collector is frozen before each fork
# (``gc.freeze``), so a worker's collections never write to the frozen objects' headers, which
# would copy their pages. And the master gives back the library pages it read while importing
# (MADV_DONTNEED on its file mappings that hold no copied page): it never runs that code, while the
# workers fault in, and share, the part they use; the pages stay in the page cache, clean.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import importlib
import os
import sys
import time
from typing import Any

from serving.backends import backend_class
from serving.backends.base import PRELOADED, preload_key
from serving.config import Settings
from serving.errors import ModelLoadError
from serving.runtime.service import InferenceService

#: madvise(2): drop these pages from this process; a clean file page maps back on its next touch.
MADV_DONTNEED = 4


def share_before_fork(server: Any, settings: Settings) -> None:
    """Import what every worker would import on its own, once, in the master."""
    if not settings.share_memory:
        return
    started = time.monotonic()
    service = InferenceService(settings)
    service.resolve()
    modules = ["serving.fronts.asgi" if settings.front == "asgi" else "serving.fronts.wsgi"]
    if settings.grpc_address(server.cfg.bind[0] if server.cfg.bind else None) is not None:
        modules.append("serving.fronts.grpc.server")  # every worker serves gRPC
    if not settings.pool_processes:  # with the pool, HTTP workers import no framework at all
        modules += served_frameworks(service)
    import_modules(modules, server.log)
    preloaded = preload_models(server, service, settings)
    built = build_app(server)
    freeze_before_fork()
    released = page_out_libraries()
    server.log.info(
        "shared by every worker: %s%s%s, made in the master in %.1fs (%d MB of library pages"
        " left to the workers)",
        ", ".join(modules),
        f"; loaded {', '.join(preloaded)}" if preloaded else "",
        "; the app built" if built else "",
        time.monotonic() - started,
        released // 1_000_000,
    )


def build_app(server: Any) -> bool:
    """Build the app (``flask_server:app`` or whatever gunicorn was given) here, once, so that
    every worker serves this copy instead of building its own after fork.

    Building reads settings and key files, sets up logging and routes, and loads no model. In a
    worker it wrote to about 6 MB of the pages it shared with the master (the code it ran, the
    objects it touched: measured with PyTorch at ``-w 4``, 7 MB private per worker before its
    model, 2 MB after); built here, those pages stay shared. An app that cannot be built here is
    left to each worker, whose own attempt reports why.
    """
    app = getattr(server, "app", None)
    if app is None or not hasattr(app, "wsgi") or server.cfg.reload:
        return False  # gunicorn's --reload restarts workers to import changed code themselves
    try:
        built = app.wsgi()
    except (Exception, SystemExit) as exc:  # an app module may exit; gunicorn's import fails
        server.log.warning("cannot build the app before fork (%s): each worker builds it", exc)
        app.callable = None
        return False
    url_map = getattr(built, "url_map", None)
    if url_map is not None:  # Flask: compile the route matcher now, not on each worker's first
        url_map.update()
    return True


def rebuild_app(server: Any, settings: Settings) -> None:
    """On SIGHUP: build the app again before the new workers start, as a worker without a built
    app would (new key files, new settings read by the configuration file)."""
    if not settings.share_memory:
        return
    app = getattr(server, "app", None)
    if app is None or getattr(app, "callable", None) is None:
        return
    module = str(getattr(app, "app_uri", "") or "").partition(":")[0]
    app.callable = None
    if module and module in sys.modules:
        # the entry module (flask_server, asgi_server) builds its app when imported
        del sys.modules[module]
    if build_app(server):
        freeze_before_fork()
        server.log.info("the app built again in the master for the new workers")


def share_in_pool_arbiter(arbiter: Any, settings: Settings) -> None:
    """The model pool's arbiter, before it forks the pool's processes: import their frameworks once.

    Every pool process, the first ones and those that replace a dead one, then starts with the
    framework in place (a TensorFlow pool process is back in about a second, not after a fresh
    import of several seconds) and shares its pages with the others; the HTTP workers, forked from
    the master, still map no framework. With one pool process there are no others: the arbiter's
    import would be a second copy of every page the process writes to (TensorFlow: 34 MB of the
    arbiter's 151 MB PSS were its own at ``-w 4``), so the process imports its framework itself.
    """
    if not settings.share_memory or settings.pool_processes < 2:
        return
    started = time.monotonic()
    service = InferenceService(settings)
    service.resolve()
    modules = served_frameworks(service)
    import_modules(modules, arbiter.log)
    freeze_before_fork()
    page_out_libraries()
    arbiter.log.info(
        "shared by every model pool process: %s, imported in %.1fs",
        ", ".join(modules) or "no framework",
        time.monotonic() - started,
    )


def served_frameworks(service: InferenceService) -> list[str]:
    """The modules the backends of every served version import."""
    modules: list[str] = []
    for backend in sorted({backend for _, backend in service.served.values()}):
        modules += [m for m in backend_class(backend).framework_modules if m not in modules]
    return modules


def import_modules(modules: list[str], log: Any) -> None:
    """Import each module; one that fails is left to the process that needs it, which says why."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:  # the worker's own load says what is missing, with its reason
            log.warning("cannot import %s before fork (%s): each process imports it", name, exc)


def preload_models(server: Any, service: InferenceService, settings: Settings) -> list[str]:
    """Load here the versions whose backend loads fork-safely (ONNX Runtime with one math thread),
    so that every worker serves the same copy of the weights; the others load in each worker."""
    if settings.pool_processes:
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


@functools.cache
def c_library() -> ctypes.CDLL:
    """This process's C library, through the program's own symbols: ``ctypes.util.find_library``
    runs ``ldconfig -p`` in a child process, a fork of a worker at its start and its exit."""
    return ctypes.CDLL(None, use_errno=True)


def page_out_libraries(smaps_path: str = "/proc/self/smaps") -> int:
    """Drop this process's resident pages of the file mappings it never wrote to.

    A read-only mapping whose ``Anonymous`` count is 0 holds only clean pages of its file, so
    ``MADV_DONTNEED`` loses nothing: a later touch maps the same page back from the page cache.
    Mappings with copied pages (relocations applied at load, then made read-only) are left alone,
    since dropping them would bring back the file's unrelocated bytes. ``MADV_PAGEOUT`` would be the
    gentler call, but the kernel ignores it for files the caller may not write (Linux 6.x), which is
    every library here. Returns the bytes of the mappings dropped (0 where madvise is not there).
    """
    try:
        libc = c_library()
        madvise = libc.madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    dropped = 0
    for start, end in _clean_file_mappings(smaps_path):
        if madvise(start, end - start, MADV_DONTNEED) == 0:
            dropped += end - start
    return dropped


def _clean_file_mappings(smaps_path: str) -> list[tuple[int, int]]:
    """(start, end) of every readable, unwritable file mapping with no anonymous (copied) page."""
    found: list[tuple[int, int]] = []
    current: tuple[int, int] | None = None
    with open(smaps_path) as smaps:
        for line in smaps:
            head = line.split(maxsplit=5)
            if head and head[0].endswith(":"):
                if head[0] == "Anonymous:" and current is not None and head[1] == "0":
                    found.append(current)
                continue
            current = None
            if len(head) == 6 and head[1][0] == "r" and "w" not in head[1] and head[5][0] == "/":
                start, end = (int(part, 16) for part in head[0].split("-"))
                current = (start, end)
    return found
