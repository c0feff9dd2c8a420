"""The model pool's processes: each holds every served model once and batches across HTTP workers.

# design: the pool's processes are gunicorn 27's dirty workers (``dirty_apps`` names
# ``ModelPoolApp``; SERVING_MODEL_POOL sets ``dirty_workers``), so gunicorn supervises them: a
# killed one is replaced by the dirty arbiter, the master replaces a dead arbiter, and SIGTERM and
# SIGHUP reach them. The data path is not the dirty arbiter's (about 300 us of JSON messages through
# the arbiter per call): each pool process runs a ``PoolServer`` thread on its own Unix socket in
# SERVING_POOL_DIR, and HTTP worker threads connect to it directly, passing tensors through shared
# memory (``serving.runtime.pool_wire``). One thread, one selector: it reads every request that
# has arrived, runs them together (up to SERVING_MAX_BATCH_SIZE samples of one model, without
# waiting for more: what arrives during a model call forms the next batch), and answers each. The
# queue is bounded (SERVING_MAX_QUEUE: 503 at once beyond it) and a request whose deadline has
# passed is answered 504 without running. The device the pool's models run on is the pool's
# setting (SERVING_POOL_DEVICE), so one process can own an accelerator.
"""

from __future__ import annotations

import gc
import logging
import math
import mmap
import os
import selectors
import signal
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from gunicorn.dirty.app import DirtyApp

from serving.backends import Backend, backend_class
from serving.config import Settings
from serving.errors import ConfigError, ModelLoadError
from serving.host.priority import pool_math_threads, raise_pool
from serving.host.sharing import page_out_libraries
from serving.observability import metrics
from serving.observability.logging import configure_logging
from serving.runtime import pool_wire as wire
from serving.runtime.service import InferenceService

log = logging.getLogger("serving")


@dataclass
class Peer:
    """One HTTP worker thread's connection: its socket, the memory it shares and unread bytes."""

    sock: socket.socket
    memory: mmap.mmap
    floats: np.ndarray
    buffer: bytearray = field(default_factory=bytearray)


@dataclass(slots=True)
class Pending:
    """A request read from a peer, waiting for its batch."""

    peer: Peer
    request_id: int
    key: str
    shape: tuple[int, ...]
    deadline: float
    size: int  # values in the batch


class PoolServer:
    """Serves ``models`` (key -> loaded backend) on the Unix socket ``path`` from one thread."""

    def __init__(
        self, models: dict[str, Backend], path: Path, max_batch_size: int, max_queue: int
    ) -> None:
        self.models, self.path = models, path
        # What /metrics shows of this process's model calls (every worker merges every process's):
        # the serving thread only appends (key, samples, seconds) here, and a thread of their own
        # counts them once a second (a Prometheus observation in the serving thread cost the
        # pooled call 3 us, every request's serial step), and samples the queue's depth then
        self._observed = {
            key: (metrics.BATCH_SIZE.labels(key), metrics.INFERENCE_LATENCY.labels(key))
            for key in models
        }
        self._depths = {key: metrics.QUEUE_DEPTH.labels(key) for key in models}
        self._calls: deque[tuple[str, int, float]] = deque(maxlen=100_000)
        self._counting = threading.Thread(
            target=self._count_calls, name="model-pool-metrics", daemon=True
        )
        self._stopped = threading.Event()
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        path.unlink(missing_ok=True)
        self.listener.bind(str(path))
        self.listener.listen(256)
        self.listener.setblocking(False)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.pending: list[Pending] = []
        self.running = True
        self._wake_r, self._wake_w = socket.socketpair()
        self.selector.register(self._wake_r, selectors.EVENT_READ)
        self.thread = threading.Thread(target=self.serve, name="model-pool", daemon=True)
        self.batches = 0
        #: The nice value each HTTP worker takes when the pool may not lower its own (the hello
        #: tells them; ``serving.host.priority``); None = keep theirs.
        self.worker_nice: int | None = None

    def start(self) -> None:
        self.thread.start()
        self._counting.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, answer what is queued, close (the process is on its way out)."""
        self.running = False
        try:
            self._wake_w.send(b"x")
        except OSError:  # the thread has ended and closed it
            pass
        self.thread.join(timeout)
        self.path.unlink(missing_ok=True)
        self._stopped.set()
        if self._counting.is_alive():
            self._counting.join(timeout)
        self._observe_calls()  # the last second's
        metrics.TALLY.flush()
        for depth in self._depths.values():
            depth.set(0)

    def _count_calls(self) -> None:
        while not self._stopped.wait(metrics.FLUSH_SECONDS):
            try:
                self._observe_calls()
                waiting = dict.fromkeys(self._depths, 0)
                for request in list(self.pending):  # a copy: the serving thread appends to it
                    waiting[request.key] += 1  # admitted requests are for served models only
                for key, depth in self._depths.items():
                    depth.set(waiting[key])
                metrics.TALLY.flush()  # at once: /metrics is then at most a second behind
            except Exception:  # never let the thread die: the next second counts again
                log.exception("counting the model pool's calls failed")

    def _observe_calls(self) -> None:
        calls = self._calls
        while True:
            try:
                key, samples, seconds = calls.popleft()
            except IndexError:  # drained (by this thread or, at stop, by the other)
                return
            sizes, latency = self._observed[key]
            metrics.TALLY.observe(sizes, samples)
            metrics.TALLY.observe(latency, seconds)

    def serve(self) -> None:
        try:
            while self.running or self.pending:
                timeout = 0.0 if self.pending else None
                for key, _ in self.selector.select(timeout):
                    if key.fileobj is self.listener:
                        self._accept()
                    elif key.fileobj is self._wake_r:
                        self._wake_r.recv(64)
                    else:
                        self._read(key.data)
                if self.pending:
                    self._run_batch()
        except Exception:  # the process must not keep a socket nobody answers on
            log.exception("the model pool's server thread failed; the process stops")
            os.kill(os.getpid(), 15)
        finally:
            for key in list(self.selector.get_map().values()):
                if isinstance(key.data, Peer):
                    self._forget(key.data)
            self.selector.close()
            self.listener.close()
            self._wake_r.close()
            self._wake_w.close()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            try:
                sock.settimeout(2.0)
                message, fds, _flags, _addr = socket.recv_fds(sock, wire.HELLO.size, 1)
                magic, version, size = wire.HELLO.unpack(message)
                if magic != wire.MAGIC or version != wire.VERSION or len(fds) != 1:
                    for fd in fds:
                        os.close(fd)
                    self._refuse(sock, "not a model pool client of this version")
                    continue
                try:
                    memory = mmap.mmap(fds[0], size)
                finally:
                    os.close(fds[0])
                body = orjson.dumps(
                    {"models": sorted(self.models), "worker_nice": self.worker_nice}
                )
                sock.sendall(wire.HELLO_REPLY.pack(200, len(body)) + body)
                sock.setblocking(False)
            except (OSError, ValueError) as exc:
                log.warning("model pool: a connection failed its hello: %s", exc)
                sock.close()
                continue
            peer = Peer(sock, memory, np.frombuffer(memory, np.float32))
            self.selector.register(sock, selectors.EVENT_READ, peer)

    @staticmethod
    def _refuse(sock: socket.socket, reason: str) -> None:
        body = orjson.dumps({"error": reason})
        try:
            sock.sendall(wire.HELLO_REPLY.pack(400, len(body)) + body)
        finally:
            sock.close()

    def _read(self, peer: Peer) -> None:
        try:
            data = peer.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._forget(peer)
            return
        buffer = peer.buffer
        buffer += data
        head = wire.REQUEST.size
        while len(buffer) >= head:
            request_id, key_length, ndim, deadline = wire.REQUEST.unpack_from(buffer)
            if key_length > wire.MAX_KEY or not 0 < ndim <= wire.MAX_DIMS:
                self._forget(peer)  # not our client: no header is this large
                return
            end = head + key_length + 4 * ndim
            if len(buffer) < end:
                return
            key = buffer[head : head + key_length].decode(errors="replace")
            shape = wire.read_dims(buffer, ndim, head + key_length)
            del buffer[:end]
            self._admit(Pending(peer, request_id, key, shape, deadline, math.prod(shape)))

    def _admit(self, request: Pending) -> None:
        if request.key not in self.models:
            self._answer_error(request, 422, f"the model pool does not serve {request.key}")
        elif request.size > len(request.peer.floats):
            self._answer_error(request, 422, f"shape {request.shape} does not fit the buffer")
        elif len(self.pending) >= self.max_queue:
            self._answer_error(request, 503, "the model pool's queue is full; retry shortly")
        else:
            self.pending.append(request)

    def _run_batch(self) -> None:
        """Run the oldest request's model on every waiting request of it that fits one batch."""
        now = time.monotonic()
        pending = self.pending
        if any(r.deadline and r.deadline < now for r in pending):
            for request in pending:
                if request.deadline and request.deadline < now:
                    self._answer_error(request, 504, "the request's deadline passed in the pool")
            pending = [r for r in pending if not (r.deadline and r.deadline < now)]
            if not pending:
                self.pending = []
                return
        key = pending[0].key
        if len(pending) == 1:
            chosen, self.pending = pending, []
        else:
            chosen, rest, samples = [], [], 0
            for request in pending:
                if request.key == key and (
                    not chosen or samples + request.shape[0] <= self.max_batch_size
                ):
                    chosen.append(request)
                    samples += request.shape[0]
                else:
                    rest.append(request)
            self.pending = rest
        inputs = [r.peer.floats[: r.size].reshape(r.shape) for r in chosen]
        batch = inputs[0] if len(inputs) == 1 else np.concatenate(inputs)
        started = time.perf_counter()
        try:
            output = self.models[key].predict(batch)
        except Exception:
            log.exception(
                "inference failed in the model pool for a batch of %d on %s", len(batch), key
            )
            for request in chosen:
                self._answer_error(request, 500, "inference failed")
            return
        finally:
            del inputs, batch
        took = time.perf_counter() - started
        self.batches += 1
        offset = 0
        for request in chosen:
            rows = output[offset : offset + request.shape[0]]
            offset += request.shape[0]
            request.peer.floats[: rows.size] = rows.reshape(-1)
            self._send(
                request,
                wire.RESPONSE.pack(request.request_id, 200, rows.ndim)
                + wire.dims_bytes(rows.shape),
            )
        self._calls.append((key, offset, took))

    def _answer_error(self, request: Pending, status: int, message: str) -> None:
        encoded = message.encode()
        self._send(request, wire.RESPONSE.pack(request.request_id, status, len(encoded)) + encoded)

    def _send(self, request: Pending, data: bytes) -> None:
        sock = request.peer.sock
        try:
            try:
                sent = sock.send(data)
            except BlockingIOError:
                sent = 0
            if sent < len(data):  # the peer's socket buffer is full (answers are tiny: rare)
                sock.setblocking(True)
                sock.settimeout(1.0)
                sock.sendall(data[sent:])
                sock.setblocking(False)
        except OSError:
            self._forget(request.peer)

    def _forget(self, peer: Peer) -> None:
        try:
            self.selector.unregister(peer.sock)
        except (KeyError, ValueError):
            pass
        peer.sock.close()
        self.pending = [r for r in self.pending if r.peer is not peer]
        peer.floats = np.empty(0, np.float32)  # releases the view, so the mapping can close
        try:
            peer.memory.close()
        except BufferError:
            pass


def _exit_while_loading(signum: int, frame: Any) -> None:
    os._exit(0)


def pool_batch_size(settings: Settings) -> int:
    """Samples per pool batch: the HTTP workers' batches together, split between pool processes."""
    if settings.pool_max_batch_size:
        return settings.pool_max_batch_size
    share = max(1, settings.workers // max(1, settings.pool_processes))
    return settings.max_batch_size * share


def load_pool_models(settings: Settings) -> dict[str, Backend]:
    """Every served version, loaded here with its own backend on the pool's device."""
    service = InferenceService(settings)
    service.resolve()
    threads = pool_math_threads(settings)
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[variable] = str(threads)
    models: dict[str, Backend] = {}
    for (name, version), (meta, backend_name) in service.served.items():
        backend = backend_class(backend_name)(meta, threads)
        backend.load()
        models[f"{name}:{version}"] = backend
    return models


class ModelPoolApp(DirtyApp):
    """gunicorn's dirty app: loads the models in ``init`` and serves them on the pool's socket."""

    def __init__(self) -> None:
        self.server: PoolServer | None = None

    def init(self) -> None:
        settings = Settings.from_env()
        configure_logging(settings)
        if not settings.pool_dir:
            raise ConfigError("the model pool has no SERVING_POOL_DIR (set by gunicorn.conf.py)")
        started = time.monotonic()
        # Nothing is served while the models load, so a stop ends the process at once (gunicorn's
        # dirty worker only marks itself, and a long load held a server's stop for the timeout).
        stops = (signal.SIGTERM, signal.SIGQUIT, signal.SIGINT)
        handlers = {stop: signal.signal(stop, _exit_while_loading) for stop in stops}
        try:
            models = load_pool_models(settings)
        except ModelLoadError as exc:
            log.error("model pool process %d cannot load its models: %s", os.getpid(), exc)
            raise
        finally:
            for stop, handler in handlers.items():
                signal.signal(stop, handler)
        # The pool's serving thread is every request's serial step: for a heavy model it comes
        # before the HTTP workers (serving/host/priority.py); the threads it starts inherit that.
        priority, threads = raise_pool(settings, models)
        gc.collect()
        gc.freeze()
        if settings.share_memory:
            page_out_libraries()
        path = Path(settings.pool_dir) / f"{os.getpid()}.sock"
        self.server = PoolServer(models, path, pool_batch_size(settings), settings.max_queue)
        self.server.worker_nice = priority.worker_nice
        self.server.start()
        log.info(
            "model pool process %d serves %s on %s (%s, %d math threads, batches of up to %d,"
            " priority: %s), loaded in %.2fs",
            os.getpid(),
            ", ".join(models),
            path,
            settings.pool_device,
            threads,
            pool_batch_size(settings),
            priority.reason,
            time.monotonic() - started,
        )

    def __call__(self, action: str, *args: Any, **kwargs: Any) -> Any:
        """The dirty client's actions: ``status`` (what this process serves and has run)."""
        if action != "status" or self.server is None:
            raise ValueError(f"unknown action {action!r}")
        return {
            "pid": os.getpid(),
            "models": sorted(self.server.models),
            "batches": self.server.batches,
        }

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
