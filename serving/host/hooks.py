"""What gunicorn.conf.py's hooks do: checks in the master, model loading in each worker.

# design: the master (``on_starting``) reads metadata and checksums, so a missing, corrupt or
# tampered model stops the server with one clear line before any worker is forked. With
# SERVING_SHARE_MEMORY (the default) it then imports the served backends' frameworks, so that
# every worker shares them, but it never loads or runs a model. Each worker loads its own model in
# ``post_worker_init``, after fork; if that fails the worker exits with gunicorn's boot-error
# code, which makes the master halt instead of respawning workers in a loop.
"""

from __future__ import annotations

import asyncio
import atexit
import gc
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from gunicorn.workers.sync import SyncWorker

from serving.backends import is_thread_safe
from serving.config import Settings
from serving.errors import ConfigError, ModelLoadError
from serving.fronts.parts import ServingParts, parts_of
from serving.host.priority import plan as priority_plan
from serving.host.priority import pool_math_threads
from serving.host.sharing import c_library
from serving.http.security import Gate, host_name
from serving.observability import drift, observed
from serving.observability.memory import set_server_root
from serving.observability.metrics import TALLY, mark_worker_dead, multiprocess_directory
from serving.runtime.service import InferenceService
from serving.runtime.waiting import ALARM, WAITER
from serving.runtime.watcher import ModelWatcher

log = logging.getLogger("serving")
DAEMON_LOG = Path("run/server.log")
# gunicorn's Arbiter.WORKER_BOOT_ERROR: the master halts instead of respawning
WORKER_BOOT_ERROR = 3


def route_daemon_logs(server: Any) -> None:
    """A daemon has no terminal: send gunicorn's and the app's logs to run/server.log unless set."""
    if server.cfg.daemon and server.cfg.errorlog == "-":
        DAEMON_LOG.parent.mkdir(parents=True, exist_ok=True)
        server.cfg.set("errorlog", str(DAEMON_LOG))
        server.cfg.set("capture_output", True)
        server.log.setup(server.cfg)


def stop_pool_after_workers(server: Any) -> None:
    """The master's graceful stop ends the HTTP workers first and the model pool after them.

    gunicorn's ``Arbiter.stop`` signals the dirty arbiter and the workers at once, so the pool's
    processes were gone while workers still finished requests that needed them: a request whose
    body was still arriving at ``docker stop`` got a 503. Here the arbiter's own stop runs twice,
    first with the pool hidden from it (the listeners close, the workers drain within the graceful
    timeout), then for the pool alone, which by then serves nobody.
    """
    stop = server.stop

    def stop_workers_then_pool(graceful: bool = True) -> None:
        pool_arbiter, server.dirty_arbiter_pid = server.dirty_arbiter_pid, 0
        try:
            stop(graceful)
        finally:
            server.dirty_arbiter_pid = pool_arbiter
        stop(graceful)

    server.stop = stop_workers_then_pool


def replace_pool_on_reload(arbiter: Any, pool_dir: str) -> None:
    """SIGHUP: the model pool's new processes take over before the old ones stop.

    gunicorn's ``DirtyArbiter.reload`` spawns new processes, then stops all but the first N it
    knows: the new ones, so a reload left the old processes (and the old models) serving. Here the
    old processes are stopped once every new one listens on its socket in the pool's directory (or
    has died, or ``dirty_timeout`` has passed); each answers what it has queued, and the HTTP
    workers' calls move to the new processes.
    """
    directory = Path(pool_dir)

    async def reload() -> None:  # run on the dirty arbiter's event loop
        old, target = list(arbiter.workers), arbiter.num_workers
        arbiter.log.info("Reloading the model pool: %d new processes replace %s", target, old)
        arbiter.num_workers = target + len(old)  # its upkeep stops neither generation meanwhile
        try:
            fresh = [pid for pid in (arbiter.spawn_worker() for _ in range(target)) if pid]
            deadline = time.monotonic() + arbiter.cfg.dirty_timeout

            def waiting() -> bool:  # a new process neither listening nor dead
                return any(
                    pid in arbiter.workers and not (directory / f"{pid}.sock").exists()
                    for pid in fresh
                )

            while waiting() and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
        finally:
            arbiter.num_workers = target
        for pid in old:
            arbiter.kill_worker(pid, signal.SIGTERM)

    arbiter.reload = reload


def check_before_fork(server: Any, settings: Settings) -> None:
    """Resolve the model and refuse contradictory settings, in the master, before forking."""
    threaded = server.cfg.threads > 1 or "thread" in str(server.cfg.worker_class_str).lower()
    try:
        service = InferenceService(settings)
        meta = service.resolve()
        unsafe = sorted(
            {backend for _, backend in service.served.values() if not is_thread_safe(backend)}
        )
        if settings.pool_processes and settings.mode == "batched":
            raise ConfigError(
                "SERVING_MODEL_POOL batches across every worker itself: serve it with"
                " SERVING_MODE=threaded (or process), not batched"
            )
        if settings.pool_processes and settings.model_control != "none":
            raise ConfigError(
                "the model pool serves the models fixed at start: SERVING_MODEL_CONTROL must be"
                " none with SERVING_MODEL_POOL"
            )
        if threaded and settings.mode != "batched" and unsafe and not settings.pool_processes:
            raise ConfigError(
                f"the {unsafe[0]} backend is process-only but gunicorn runs {server.cfg.threads} "
                "threads"
                " per worker: drop --threads, use SERVING_MODE=batched (one model thread per "
                "worker), or"
                " SERVING_BACKEND=onnx to serve its ONNX export with threads"
            )
        check_payload_log(settings)
        grpc_address = check_grpc_address(settings, server.cfg.bind)
        warn_if_exposed(server, settings, grpc_address)
        for model_meta, _ in service.served.values():
            if not model_meta.verified:
                server.log.warning(
                    "%s:%d is a TF Serving folder without metadata.json: no digest is checked for "
                    "it, labels are"
                    " 0..%d and inputs are taken in [%g, %g]; `serving import %s --name %s` "
                    "records digests,"
                    " labels and the input range",
                    model_meta.name,
                    model_meta.version,
                    len(model_meta.labels) - 1,
                    *model_meta.input_range,
                    model_meta.path,
                    model_meta.name,
                )
    except (ModelLoadError, ConfigError) as exc:
        server.log.error("cannot start: %s", exc)
        raise RuntimeError(str(exc)) from None
    workers = server.cfg.workers
    server.log.info(
        "serving %s version %d (%s backend, %s) with %d workers x %d threads; math threads per "
        "worker: %d%s; gRPC: %s; CPU affinity: %s",
        meta.name,
        meta.version,
        service.backend_name,
        settings.mode,
        workers,
        server.cfg.threads,
        settings.math_threads_for(workers),
        "; also "
        f"{', '.join(f'{n}:{v}' for n, v in service.served if (n, v) != (meta.name, meta.version))}"
        if len(service.served) > 1
        else "",
        f"{grpc_address} (every worker)" if grpc_address else "off",
        "each worker pinned to its cores" if settings.cpu_affinity else "off",
    )
    if settings.pool_processes:
        server.log.info(
            "model pool: %d processes x %d math threads; priority: %s",
            settings.pool_processes,
            pool_math_threads(settings),
            priority_plan(settings).reason,
        )


def check_payload_log(settings: Settings) -> None:
    """A payload log file the server cannot append to stops the start (not a warning per record)."""
    target = settings.payload_log
    if not target or target == "stdout" or target.startswith(("http://", "https://")):
        return
    try:
        with open(target, "a"):
            pass
    except OSError as exc:
        raise ConfigError(
            f"SERVING_PAYLOAD_LOG={target!r} cannot be appended to ({exc.strerror}): give a file in"
            " a writable directory, stdout, or an http(s):// sink"
        ) from None


def check_grpc_address(settings: Settings, binds: list[str]) -> str | None:
    """The gRPC address, once the master has bound it alone for a moment (ConfigError if it cannot).

    The workers bind it with SO_REUSEPORT, which would let them share the port with another server
    of the same user without a word: binding it without that option first fails instead when
    anything holds it (another server, an earlier one still running).
    """
    address = settings.grpc_address(binds[0] if binds else None)
    if address is None:
        return None
    host, _, port = address.rpartition(":")
    try:
        family, kind, proto, _, where = socket.getaddrinfo(
            host.strip("[]") or None, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, proto) as probe:
            probe.bind(where)
    except OSError as exc:
        raise ConfigError(
            f"the gRPC address {address} cannot be bound ({exc.strerror or exc}): another server"
            " may hold it; set SERVING_GRPC_BIND to a free HOST:PORT, or off"
        ) from None
    return address


def warn_if_exposed(server: Any, settings: Settings, grpc_address: str | None = None) -> None:
    """A bind beyond loopback with no key: say at start what anyone who reaches the port can do."""
    # also refuses an unreadable key file or a short key, in the master, before forking
    gate = Gate(settings)
    exposed = [
        address
        for address in [*server.cfg.bind, *([grpc_address] if grpc_address else [])]
        if not address.startswith("unix:") and not _loopback(host_name(address))
    ]
    if exposed and not gate.keys_on:
        server.log.warning(
            "listening on %s with no API key: anyone who reaches the port can run inference, read "
            "/metrics and"
            " the model index; set SERVING_API_KEYS and SERVING_ADMIN_KEYS, SERVING_ALLOWED_HOSTS"
            " to the names clients use, and put nginx in front (deploy/nginx.conf;"
            " docs/security.md)",
            ", ".join(exposed),
        )
    if exposed:
        gate.allow_binds(list(server.cfg.bind))
        server.log.info(
            "requests to %s must name this server in their Host header: %s%s",
            ", ".join(exposed),
            "any name (SERVING_ALLOWED_HOSTS=*)"
            if gate.hosts is None
            else ", ".join(sorted(gate.hosts)),
            ""
            if settings.allowed_hosts.strip()
            else "; SERVING_ALLOWED_HOSTS sets the list (a DNS name clients use, a proxy's)",
        )


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def worker_exited(worker: Any) -> None:
    """Master: a worker is gone; its live gauges (queue depth, model info) and its drift window
    must stop counting."""
    mark_worker_dead(worker.pid)
    drift.forget_worker(multiprocess_directory(), worker.pid)


def drain_worker(worker: Any) -> None:
    """Worker, on its way out: let the gRPC calls in flight finish, answer everything still queued
    for the model thread, then flush metrics."""
    parts = parts_of(getattr(worker, "wsgi", None))
    service = parts.service if parts is not None else None
    front = getattr(worker, "grpc_front", None)
    try:
        if front is not None:
            front.wait()
        if service is not None:
            service.close()
    finally:
        observed.close_all()  # spans, payload records and the drift window still buffered
        TALLY.flush()


def start_grpc(worker: Any, parts: ServingParts) -> None:
    """Serve gRPC in this worker, on the port every worker shares; exit with the boot-error code
    when it cannot be bound (the master then stops instead of respawning)."""
    address = parts.settings.grpc_address(worker.cfg.bind[0] if worker.cfg.bind else None)
    if address is None:
        return
    # grpcio and the protocol's messages are imported by a server that serves gRPC only (5 MB at
    # -w 4); with SERVING_SHARE_MEMORY the master imported them before fork (host.sharing)
    from serving.fronts.grpc.server import GrpcFront

    front = GrpcFront(parts, address)
    try:
        front.start()
    except (RuntimeError, OSError) as exc:
        worker.log.error("worker %d cannot serve gRPC on %s: %s", worker.pid, address, exc)
        sys.exit(WORKER_BOOT_ERROR)
    worker.grpc_front = front
    # SIGTERM stops new gRPC calls at once, as it stops the HTTP listeners; the ASGI workers'
    # event loop takes the signal over, and their stop calls begin_stop (serving.host.asgi_workers)
    previous = signal.getsignal(signal.SIGTERM)

    def stop_then_exit(signum: int, frame: Any) -> None:
        front.begin_stop()
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, stop_then_exit)


def leave_worker() -> None:
    """Worker, last of all: end the process with its exit code, without C++ static destructors.

    Called from gunicorn's ``worker_exit`` hook, inside the ``finally`` its ``sys.exit`` passes
    through. A framework imported by the master before fork (SERVING_SHARE_MEMORY) left threads in
    the master that a forked worker does not have, and onnxruntime's static destructors then wait
    forever on one of their condition variables, or abort on ``std::system_error``, as the worker
    exits: a reload waited for the graceful timeout, and a worker that failed to boot died by
    SIGABRT instead of exiting 3, so the master respawned it in a loop. Python's exit handlers
    (logging's flush among them) still run.
    """
    error = sys.exc_info()[1]
    code: object = error.code if isinstance(error, SystemExit) else int(error is not None)
    if not isinstance(code, int):
        if code is not None:
            print(code, file=sys.stderr)
        code = 0 if code is None else 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or a pipe nobody reads any more
            pass
    os._exit(code)


class HangWatchdog(threading.Thread):
    """Batched mode: a model call running longer than gunicorn's timeout means a hung model thread.

    gthread workers keep heartbeating while their model thread hangs, so gunicorn would never
    replace them; requests would only get 504s. The watchdog asks the worker to stop gracefully
    (SIGTERM): queued requests finish or time out, and the master starts a fresh worker.
    """

    def __init__(self, service: InferenceService, limit_s: float, log: Any) -> None:
        super().__init__(name="hang-watchdog", daemon=True)
        self.service, self.limit_s, self.log = service, limit_s, log

    def run(self) -> None:
        while True:
            time.sleep(min(1.0, self.limit_s / 4))
            if any(batcher.busy_seconds() > self.limit_s for batcher in self.service.batchers()):
                self.log.error(
                    "worker %d: a model call has run for over %.0fs; restarting the worker",
                    os.getpid(),
                    self.limit_s,
                )
                os.kill(os.getpid(), signal.SIGTERM)
                return


#: glibc's mallopt parameter: allocations at least this large are mapped, and unmapped when freed.
M_MMAP_THRESHOLD = -3
LARGE_BLOCK_BYTES = 1 << 20


def return_large_blocks() -> None:
    """Give large freed blocks back to the system at once, in this worker.

    glibc raises its mmap threshold each time a mapped block is freed, so after the first decoded
    upload a 16 MB image buffer comes from a thread's malloc arena and stays there when freed: 16
    request threads decoding in turn kept about 600 MB in a worker that idles at 80 MB (measured,
    tests/server/test_hostile_uploads.py). A fixed threshold of 1 MiB maps every buffer that large
    and unmaps it when it is freed; the request path's own arrays are far smaller.
    """
    try:
        libc = c_library()
        libc.mallopt(M_MMAP_THRESHOLD, LARGE_BLOCK_BYTES)
    except (OSError, AttributeError):  # not glibc: its own allocator's policy stands
        pass


def give_back_free_heap() -> None:
    """Return the free pages of every malloc arena to the system (glibc's malloc_trim).

    Loading and tracing a model frees much of what it allocated, and those freed pages, many of
    them copied from the master's on first write, stay in this worker until malloc reuses them.
    """
    try:
        libc = c_library()
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _stop_while_loading(signum: int, frame: Any) -> None:
    sys.exit(0)


def load_in_worker(worker: Any) -> None:
    """Load this worker's model after fork; exit with the boot-error code if it cannot be loaded."""
    parts = parts_of(worker.wsgi)
    if parts is None:
        return  # not our app (a custom WSGI wrapper): it loads lazily on the first request
    service = parts.service
    # the Host names of what gunicorn really binds (its -b flag may differ from SERVING_BIND)
    parts.gate.allow_binds(list(worker.cfg.bind))
    set_server_root(worker.ppid)  # /metrics reports the memory of the master and every process
    # it serves requests on this thread: bound direct calls by SIGALRM
    return_large_blocks()
    if isinstance(worker, SyncWorker):
        WAITER.set(ALARM)
    # Nothing is served while the models load, so a stop then ends the worker at once: gunicorn's
    # own handler only marks it, and a worker waiting for a model pool that stopped with the server
    # held the stop until the graceful timeout.
    serving_handler = signal.signal(signal.SIGTERM, _stop_while_loading)
    try:
        service.load(workers=worker.cfg.workers)
    except (ModelLoadError, ConfigError) as exc:
        worker.log.error("worker %d cannot load the model: %s", worker.pid, exc)
        sys.exit(WORKER_BOOT_ERROR)
    finally:
        signal.signal(signal.SIGTERM, serving_handler)
    if service.batchers():
        HangWatchdog(service, float(worker.cfg.timeout), worker.log).start()
    # every mode: traffic rules change at run time and failing candidates are rolled back
    watcher = ModelWatcher(service, worker.cfg.workers)
    watcher.prime()
    watcher.start()
    start_grpc(worker, parts)
    # Everything loaded so far (frameworks, models, the app) lives as long as the worker: moved out
    # of the cyclic collector's reach, a full collection walks only what connections and requests
    # allocate. Measured: a full collection in an ONNX worker took 8-10 ms, a stall every request of
    # that worker waited for; after the freeze it takes microseconds (docs/modes.md, idle
    # connections).
    gc.freeze()
    give_back_free_heap()
