"""The HTTP worker's side of the model pool: a backend that sends its batches to a pool process.

# design: with SERVING_MODEL_POOL=N the HTTP workers import no framework and hold no model. Each
# served version's backend is a ``PooledBackend``: every request thread keeps one connection to
# one pool process (a Unix socket plus a memfd both sides map, ``serving.runtime.pool_wire``) and
# has one call in flight on it. The pool process batches what all HTTP workers send. A connection
# that fails mid-call (its pool process was killed, or is being replaced after a SIGHUP) is
# dropped and the call is retried once on another pool process, since inference has no side
# effects; when none answers the request gets a 503 with Retry-After, never a hang: every wait on
# the socket is bounded by the request deadline. A call cut short by its deadline (SIGALRM in a
# sync worker) leaves an answer on its way, so that connection is dropped too.
"""

from __future__ import annotations

import math
import mmap
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import orjson

from serving.backends.base import Backend
from serving.errors import (
    DeadlineExceeded,
    InferenceError,
    InvalidInput,
    ModelLoadError,
    PoolUnavailable,
    QueueFull,
    ServingError,
)
from serving.runtime import pool_wire as wire
from serving.store.repository import ModelMetadata

#: How long a worker's start waits for a pool process to serve its model (the pool loads it).
LOAD_WAIT_S = 120.0
CONNECT_TIMEOUT_S = 2.0
#: One read takes a whole answer: its header, the output shape or an error message.
ANSWER_READ = 65536
#: A caller alone in its worker polls this long for its answer before it sleeps in ``recv``.
#: Waking a sleeping caller from the other core is most of a quick call's cost (a bare round trip
#: between two processes over a Unix socket: 35 us here, 9 us on one core); a small model answers
#: sooner than this. With other request threads waiting too, nobody polls: each poll would take
#: the GIL from them (measured: 5-10% fewer requests/s at 64 connections on the large model).
SPIN_S = 50e-6
#: After a poll that ran out, this many calls sleep at once: a slow model or a busy pool costs
#: one poll in that many, not one per call.
SPIN_BACKOFF = 16


def set_threads_nice(value: int) -> None:
    """Set every thread of this process to nice ``value`` (Linux keeps one per thread, and a new
    thread inherits its creator's)."""
    for task in Path("/proc/self/task").iterdir():
        try:
            os.setpriority(os.PRIO_PROCESS, int(task.name), value)
        except ProcessLookupError:  # the thread ended meanwhile
            continue


class PoolConnection:
    """One request thread's connection to one pool process, with the memory both sides map."""

    def __init__(self, path: Path, size: int, timeout_s: float) -> None:
        self.path = path
        fd = os.memfd_create("serving-pool", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            self.memory = mmap.mmap(fd, size)
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.settimeout(CONNECT_TIMEOUT_S)
                self.sock.connect(str(path))
                socket.send_fds(self.sock, [wire.HELLO.pack(wire.MAGIC, wire.VERSION, size)], [fd])
                status, length = wire.HELLO_REPLY.unpack(
                    wire.recv_exact(self.sock, wire.HELLO_REPLY.size)
                )
                body = orjson.loads(wire.recv_exact(self.sock, length))
            except BaseException:
                self.sock.close()
                raise
        finally:
            os.close(fd)
        if status != 200:
            self.close()
            raise ConnectionError(f"the pool process refused the connection: {body.get('error')}")
        # A blocking socket whose waits the kernel bounds (SO_RCVTIMEO): one system call per read,
        # where Python's own timeout polls first. The bound is the longest request deadline.
        self.sock.settimeout(None)
        bound = wire.TIMEVAL.pack(int(timeout_s), int((timeout_s % 1) * 1_000_000))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, bound)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, bound)
        self.floats = np.frombuffer(self.memory, np.float32)
        self.models: frozenset[str] = frozenset(body["models"])
        # A pool that comes first but may not lower its own nice value asks the HTTP workers to
        # raise theirs (serving/host/priority.py): the whole worker, once.
        wanted = body.get("worker_nice")
        if isinstance(wanted, int) and os.getpriority(os.PRIO_PROCESS, 0) < wanted:
            try:
                set_threads_nice(wanted)
            except OSError:  # another user's thread, or a security module: keep the nice value
                pass
        self.next_id = 0
        self._sleep_next = 0

    def call(
        self, key: bytes, batch: np.ndarray, deadline: float, poll: bool = False
    ) -> np.ndarray:
        """Run ``batch`` on model ``key`` in the pool process; raise the error its status means.
        ``poll``: wait for the answer polling first (``SPIN_S``)."""
        size = batch.size
        if batch.ndim > wire.MAX_DIMS or batch.ndim == 0:
            raise InvalidInput(f"a batch of {batch.ndim} dimensions cannot go to the pool")
        if size > len(self.floats):
            raise InvalidInput(f"a batch of {4 * size} bytes is larger than the pool's buffer")
        self.floats[:size] = batch.reshape(-1)
        self.next_id = request_id = (self.next_id + 1) & 0xFFFFFFFF
        self.sock.sendall(
            wire.REQUEST.pack(request_id, len(key), batch.ndim, deadline)
            + key
            + wire.dims_bytes(batch.shape)
        )
        try:
            reply = self._first_read(poll)
            if len(reply) < wire.RESPONSE.size:
                reply += wire.recv_exact(self.sock, wire.RESPONSE.size - len(reply))
            answer_id, status, count = wire.RESPONSE.unpack_from(reply)
            needed = wire.RESPONSE.size + (4 * count if status == 200 else count)
            if len(reply) < needed:
                reply += wire.recv_exact(self.sock, needed - len(reply))
        except BlockingIOError:  # SO_RCVTIMEO passed
            raise DeadlineExceeded("no answer from the model pool within the deadline") from None
        if answer_id != request_id:
            raise ConnectionError("the model pool answered another request")
        extra = reply[wire.RESPONSE.size : needed]
        if status != 200:
            raise _error(status, extra.decode(errors="replace"))
        shape = wire.read_dims(extra, count)
        return self.floats[: math.prod(shape)].reshape(shape).copy()

    def _first_read(self, poll: bool) -> bytes:
        """The answer's first bytes: with ``poll``, polled for up to ``SPIN_S`` first (unless a
        recent poll ran out), then waited for."""
        if poll and self._sleep_next:
            self._sleep_next -= 1
        elif poll:
            recv, clock = self.sock.recv, time.perf_counter
            until = clock() + SPIN_S
            while clock() < until:
                try:
                    return recv(ANSWER_READ, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    pass
            self._sleep_next = SPIN_BACKOFF
        return self.sock.recv(ANSWER_READ)

    def close(self) -> None:
        self.sock.close()
        self.floats = np.empty(0, np.float32)  # releases the view, so the mapping can close
        try:
            self.memory.close()
        except BufferError:  # an array still views it: the mapping goes with the array
            pass


def _error(status: int, message: str) -> ServingError:
    if status == 503:
        return QueueFull(message)
    if status == 504:
        return DeadlineExceeded(message)
    if status == 422:
        return InvalidInput(message)
    return InferenceError("inference failed in the model pool; the error is in the server log")


class PoolClient:
    """This worker's connections to the pool processes listening in ``directory``, per thread."""

    def __init__(self, directory: Path, buffer_bytes: int, timeout_s: float) -> None:
        self.directory, self.buffer_bytes, self.timeout_s = directory, buffer_bytes, timeout_s
        self._local = threading.local()
        self._turn = 0
        self._calling = 0  # request threads of this worker in ``call`` now
        self._calling_lock = threading.Lock()
        self._open: set[PoolConnection] = set()  # every thread's, so ``close`` can close them
        self._open_lock = threading.Lock()

    def sockets(self) -> list[Path]:
        """The pool processes' sockets, in a per-thread rotation so threads spread over them."""
        paths = sorted(self.directory.glob("*.sock"))
        if not paths:
            return []
        self._turn += 1
        start = (os.getpid() + self._turn) % len(paths)
        return paths[start:] + paths[:start]

    def connection(self, exclude: Path | None = None) -> PoolConnection:
        """This thread's connection, opened to the first pool process that accepts it."""
        current: PoolConnection | None = getattr(self._local, "connection", None)
        if current is not None and current.path != exclude:
            return current
        for path in self.sockets():
            if path == exclude:
                continue
            try:
                current = PoolConnection(path, self.buffer_bytes, self.timeout_s)
            except ConnectionRefusedError:  # a killed process's socket: nobody listens
                path.unlink(missing_ok=True)
                continue
            except OSError:
                continue
            self._local.connection = current
            with self._open_lock:
                self._open.add(current)
            return current
        raise PoolUnavailable("no model pool process is answering; retry shortly")

    def drop(self) -> None:
        """Forget this thread's connection (after a failure or an answer left on the way)."""
        current = getattr(self._local, "connection", None)
        self._local.connection = None
        if current is not None:
            with self._open_lock:
                self._open.discard(current)
            current.close()

    def close(self) -> None:
        """Close every thread's connection (the service is closing)."""
        with self._open_lock:
            connections, self._open = self._open, set()
        for connection in connections:
            connection.close()

    def call(self, key: str | bytes, batch: np.ndarray) -> np.ndarray:
        """Run ``batch`` on ``key`` in some pool process; retried once on another if one fails."""
        encoded = key.encode() if isinstance(key, str) else key
        deadline = time.monotonic() + self.timeout_s
        failed: Path | None = None
        with self._calling_lock:
            self._calling += 1
            alone = self._calling == 1
        try:
            for _attempt in range(2):
                connection = self.connection(exclude=failed)
                try:
                    return connection.call(encoded, batch, deadline, poll=alone)
                except (ConnectionError, BrokenPipeError, OSError):
                    failed = connection.path
                    self.drop()
                except ServingError as exc:
                    if isinstance(exc, DeadlineExceeded):
                        self.drop()  # its answer may still come: this connection is out of step
                    raise
                except BaseException:  # cut short (SIGALRM): the same
                    self.drop()
                    raise
            raise PoolUnavailable(
                "the model pool process serving this request stopped; retry shortly"
            )
        finally:
            with self._calling_lock:
                self._calling -= 1

    def wait_for(self, key: str, limit_s: float = LOAD_WAIT_S) -> None:
        """Block until a pool process serves ``key`` (the pool loads models while workers start)."""
        deadline = time.monotonic() + limit_s
        last = "no pool process is listening yet"
        while time.monotonic() < deadline:
            try:
                connection = self.connection()
            except PoolUnavailable:
                time.sleep(0.1)
                continue
            if key in connection.models:
                return
            last = f"the pool serves {', '.join(sorted(connection.models)) or 'nothing'}"
            self.drop()
            time.sleep(0.2)
        raise ModelLoadError(f"the model pool did not serve {key} within {limit_s:.0f}s ({last})")


class PooledBackend(Backend):
    """A served version whose model runs in the pool: ``predict`` is a call to a pool process."""

    name = "pool"
    thread_safe = True
    artifact = ""

    def __init__(self, metadata: ModelMetadata, math_threads: int, client: PoolClient) -> None:
        super().__init__(metadata, math_threads)
        self.client = client
        self.key = f"{metadata.name}:{metadata.version}"
        self._encoded = self.key.encode()

    def load(self) -> None:
        self.client.wait_for(self.key)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self.client.call(self._encoded, batch)

    def framework_version(self) -> str:
        return f"the model pool ({self.client.directory})"
