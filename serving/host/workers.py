"""gunicorn's sync and gthread workers with two changes: JSON error pages, and a bound on client
silence.

``serving/host/conf.py`` selects ``SyncWorker`` (process mode) or ``ThreadWorker`` (threaded and
batched modes) from this module; everything else is gunicorn's own code.

**JSON error pages.** gunicorn answers a request it cannot parse (400 bad request line, 414 URI too
long, 431 header fields too large, ...) itself, before the app sees it, with an HTML page. Here
those answers are ``{"error": "..."}`` with ``Content-Type: application/json`` and
``X-Content-Type-Options: nosniff``, like every answer of the app. gunicorn keeps deciding the
status, logging and access-logging:
``handle_error`` hands it a recorder instead of the client socket, and writes the status it recorded
to the client as JSON. A gunicorn release that changes its page layout cannot break this: only the
status line is read.

**Client silence.** gunicorn 27 has no header or read timeout. A sync worker reads a request on a
blocking socket, so a client that sends half a request head and then nothing holds the worker until
the master kills it for missing its heartbeat (``timeout``, 30 s), and its models load again. A
gthread worker waits up to 5 s for the first byte off-thread, but a partial head then holds a
request thread with no bound at all (its heartbeat goes on, so nothing ever kills it). Each accepted
socket here gets a kernel receive timeout (``SO_RCVTIMEO``, which gunicorn's ``setblocking`` calls
keep), and a read that times out reads as the end of the stream: gunicorn then treats the client as
gone (a debug line), and a body cut short is answered by the app as a bad request. TLS needs its own
bound, because Python's TLS layer waits without limit on a blocking socket whatever the kernel
timeout: with TLS, each blocking read and the handshake run under a socket timeout
(``TLSClientSocket``, installed by gunicorn's
``ssl_context`` hook in serving/host/conf.py). A silent client costs a worker (or a thread) at most
``silence_limit`` seconds. That is a bound, not immunity: a few connections per worker, renewed
every few seconds, still keep every sync worker busy. Anything beyond loopback goes through nginx
(``deploy/nginx.conf``), which reads whole requests before gunicorn sees them (docs/security.md).
"""

from __future__ import annotations

import socket
import ssl
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

from gunicorn import util
from gunicorn.workers import gthread, sync

from serving.config import CLIENT_SILENCE_S, silence_limit
from serving.errors import ConfigError
from serving.host import balance
from serving.http.encoding import json_bytes

#: Longest error message echoed: gunicorn's messages quote the offending request line or header.
MESSAGE_LIMIT = 200


class ClientSocket(socket.socket):
    """A client socket whose blocking reads end, as at end of stream, after ``limit`` seconds of
    silence."""

    @classmethod
    def adopt(cls, sock: socket.socket, limit: float) -> ClientSocket:
        """Take over ``sock``'s descriptor (``sock`` is detached) and set the kernel receive
        timeout."""
        timeout = sock.gettimeout()
        adopted = cls(sock.family, sock.type, sock.proto, fileno=sock.detach())
        adopted.settimeout(timeout)
        adopted.silent = False
        adopted.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(limit))
        return adopted

    silent: bool

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if self.silent:  # gone for good: also no lingering for it in gunicorn's graceful close
            return b""
        try:
            return super().recv(bufsize, flags)
        except BlockingIOError:
            # a non-blocking socket with nothing to read: not a timeout
            if self.gettimeout() == 0.0:
                raise
            self.silent = True  # the receive timeout expired
            return b""


class TLSClientSocket(ssl.SSLSocket):
    """A TLS client socket whose blocking reads and handshake end after ``silence`` seconds of
    silence.

    A read that times out reads as the end of the stream, like ``ClientSocket``; a handshake that
    times out raises the TLS end-of-stream error, which gunicorn closes quietly.
    """

    silence = CLIENT_SILENCE_S
    silent = False

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        if self.silent:
            return b""
        try:
            with self._bounded():
                return super().recv(buflen, flags)
        except TimeoutError:
            self.silent = True
            return b""

    def do_handshake(self, block: bool = False) -> None:
        try:
            with self._bounded():
                super().do_handshake(block)
        except TimeoutError:
            self.silent = True
            raise ssl.SSLEOFError(
                ssl.SSL_ERROR_EOF, "the client went silent during the TLS handshake"
            ) from None

    @contextmanager
    def _bounded(self) -> Iterator[None]:
        """Run a blocking call under the silence limit; a socket with its own timeout keeps it."""
        if self.gettimeout() is not None:
            yield
            return
        self.settimeout(self.silence)
        try:
            yield
        finally:
            self.settimeout(None)


@cache
def tls_socket_class(silence: float) -> type[TLSClientSocket]:
    """``TLSClientSocket`` with its silence limit (one class per limit, made once)."""
    return type("TLSClientSocket", (TLSClientSocket,), {"silence": silence})


def check_tls_files(certfile: str, keyfile: str) -> None:
    """Refuse, with one line, a certificate and key that cannot serve TLS (gunicorn would fail
    later)."""
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile)
    except OSError as exc:  # ssl.SSLError included
        reason = exc.strerror or getattr(exc, "reason", None) or str(exc)
        raise ConfigError(
            f"SERVING_CERTFILE={certfile!r} and SERVING_KEYFILE={keyfile!r} cannot serve TLS:"
            f" {reason}; give a PEM certificate (chain) and its private key"
        ) from None


def tls_context(
    config: Any, default_ssl_context_factory: Callable[[], ssl.SSLContext]
) -> ssl.SSLContext:
    """gunicorn's ``ssl_context`` hook: its own context, whose sockets bound a silent client."""
    context = default_ssl_context_factory()
    context.sslsocket_class = tls_socket_class(silence_limit(config.timeout))
    return context


@cache
def _timeval(seconds: float) -> bytes:
    """``seconds`` as the ``struct timeval`` SO_RCVTIMEO takes."""
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1_000_000))


class _ErrorRecorder:
    """Stands in for the client socket while gunicorn writes its HTML error page; keeps what it
    wrote."""

    def __init__(self) -> None:
        self.written = b""

    def gettimeout(self) -> float:
        return 0.0

    def setblocking(self, flag: bool) -> None:
        pass

    def sendall(self, data: bytes) -> None:
        self.written += data

    def send(self, data: bytes) -> int:
        self.written += data
        return len(data)


def status_of(page: bytes) -> tuple[int, str] | None:
    """The status code and reason of an HTTP answer, from its status line; None when there is
    none."""
    parts = page.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        return None
    return int(parts[1]), parts[2] if len(parts) > 2 else ""


def error_message(status: int, reason: str, exc: BaseException) -> str:
    """What the JSON says: the reason, and for a client error what gunicorn found wrong
    (bounded)."""
    detail = str(exc) if status < 500 else ""
    if len(detail) > MESSAGE_LIMIT:
        detail = detail[:MESSAGE_LIMIT] + "..."
    reason = reason.lower() or "error"
    return f"{reason}: {detail}" if detail else reason


def render(status: int, reason: str, message: str) -> bytes:
    """A complete HTTP/1.1 error answer with a JSON body, closing the connection."""
    body = json_bytes({"error": message})
    head = (
        f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
        f"X-Content-Type-Options: nosniff\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


class JsonErrors:
    """Worker mixin: gunicorn's own error answers as JSON."""

    log: Any
    cfg: Any

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        recorder = _ErrorRecorder()
        super().handle_error(req, recorder, addr, exc)  # type: ignore[misc]
        status = status_of(recorder.written)
        if status is None:
            return
        code, reason = status
        try:
            util.write_nonblock(client, render(code, reason, error_message(code, reason, exc)))
        except Exception:
            self.log.debug("Failed to send error message.")


class SyncWorker(JsonErrors, sync.SyncWorker):
    """gunicorn's sync worker (process mode). The name keeps gunicorn's rule: with --threads N > 1,
    gunicorn runs its own gthread worker instead."""

    def handle(self, listener: Any, client: socket.socket, addr: Any) -> None:
        super().handle(listener, ClientSocket.adopt(client, silence_limit(self.cfg.timeout)), addr)


class ThreadWorker(JsonErrors, gthread.ThreadWorker):
    """gunicorn's gthread worker (threaded and batched modes), which also spreads keep-alive
    connections evenly over the workers (``serving.host.balance``)."""

    def notify(self) -> None:
        super().notify()
        balance.publish(getattr(self, balance.ATTRIBUTE, None), self.nr_conns)

    def accept(self, listener: Any) -> None:
        balance.yield_to_others(getattr(self, balance.ATTRIBUTE, None), self.nr_conns)
        super().accept(listener)

    def handle(self, conn: Any) -> Any:
        if not conn.initialized and not isinstance(conn.sock, ClientSocket):
            conn.sock = ClientSocket.adopt(conn.sock, silence_limit(self.cfg.timeout))
        return super().handle(conn)
