"""The two ASGI workers the front runs under: gunicorn.conf.py selects one with SERVING_FRONT=asgi.

- ``UvicornWorker``: the maintained ``uvicorn_worker.UvicornWorker`` (uvloop and httptools when
  installed), with two changes. uvicorn's own access log is off: the app writes one access line per
  request, as on WSGI, and uvicorn's would cost a LogRecord per request that gunicorn's disabled
  access log then drops. And a graceful stop (SIGTERM, SIGHUP, max_requests) no longer drops
  requests: uvicorn's ``Server.shutdown`` closes every connection whose request has not been parsed
  yet, so a client that connected just before the stop, or whose request is still in flight on the
  wire, gets a reset. Measured under the reliability tests' load: 23 of 824 requests failed across
  one SIGHUP and a few max_requests recyclings. Here the listeners close first and such connections
  get
  ``FIRST_REQUEST_GRACE_S`` for their request to arrive; it is then answered with Connection: close.
  And the request head gets gunicorn's limits (``limit_request_line``, ``limit_request_fields``,
  ``limit_request_field_size``), which uvicorn's httptools protocol does not have: it keeps any
  number of header fields of any size in memory. What it refuses, and a request it cannot parse,
  get the JSON errors of the WSGI workers (414, 431, 400) instead of uvicorn's plain text.
- ``AsgiWorker``: gunicorn 27's native ``asgi`` worker, with its app also reachable as
``worker.wsgi``
  (where gunicorn.conf.py's hooks look for it), and with SIGTERM closing the listeners at once
  instead of at the worker's next one-second tick, so a new connection is refused, not served, once
  the stop began.

Both refuse to boot on a WSGI app (``gunicorn -c gunicorn.conf.py flask_server:app`` with
SERVING_FRONT=asgi) with one line that says what to run instead. The plain classes (``-k asgi``,
``-k uvicorn_worker.UvicornWorker``) work too, without these changes. Which one is the default is
decided by measurement (docs/modes.md).
"""

from __future__ import annotations

import asyncio
import socket
import sys
from typing import Any

from gunicorn.workers.gasgi import ASGIWorker as _GunicornAsgiWorker
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import Server
from uvicorn_worker import UvicornWorker as _UvicornWorker

from serving.fronts.parts import parts_of
from serving.host.workers import MESSAGE_LIMIT, render

# gunicorn's Arbiter.WORKER_BOOT_ERROR: the master stops instead of respawning
WORKER_BOOT_ERROR = 3
#: How long a stopping uvicorn worker waits for the request of a connection it accepted but has not
#: read.
FIRST_REQUEST_GRACE_S = 1.0


def check_asgi_app(app: Any, log: Any) -> None:
    """Exit with the boot-error code when ``app`` is this project's WSGI (Flask) app, not an ASGI
    one."""
    parts = parts_of(app)
    if parts is not None and parts.front == "wsgi":
        log.error(
            "SERVING_FRONT=asgi runs an ASGI app: serve asgi_server:app (gunicorn -c "
            "gunicorn.conf.py"
            " asgi_server:app), or unset SERVING_FRONT to serve flask_server:app"
        )
        sys.exit(WORKER_BOOT_ERROR)


class GracefulServer(Server):  # type: ignore[misc]
    """uvicorn's server, except that a stop answers the connections it accepted but had not read
    yet."""

    #: The worker's gRPC front, stopped with the HTTP listeners (set by ``UvicornWorker``).
    grpc_front: Any = None

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.grpc_front is not None:
            self.grpc_front.begin_stop()
        for server in self.servers:
            # stop accepting first; uvicorn's shutdown closes them again (idempotent)
            server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FIRST_REQUEST_GRACE_S
        while loop.time() < deadline and any(
            getattr(connection, "cycle", None) is None
            for connection in self.server_state.connections
        ):
            await asyncio.sleep(0.02)
        await super().shutdown(sockets)


class HeadTooLarge(Exception):
    """Raised from a parser callback to stop parsing a head over a limit (httptools then raises
    its own)."""


class LimitedHttpProtocol(HttpToolsProtocol):  # type: ignore[misc]
    """uvicorn's httptools protocol with gunicorn's limits on the request head, and JSON error
    answers.

    The limits are class attributes that ``UvicornWorker`` sets from gunicorn's settings (a subclass
    per worker). A head that has not ended within ``head_bytes`` is refused before the parser
    buffers more, so a client cannot grow a worker's memory with one endless header.
    """

    line_limit, fields_limit, field_size_limit = 4094, 100, 8190  # gunicorn's defaults
    head_bytes = 4094 + 2 + 100 * (8190 + 2) + 2  # the largest head those limits allow
    refusal: tuple[int, str, str] | None = None
    head_read = 0
    in_head = True
    fields = 0

    @classmethod
    def with_limits(cls, line: int, fields: int, field_size: int) -> type[LimitedHttpProtocol]:
        unlimited = 2**31  # gunicorn's 0
        line, fields, field_size = line or unlimited, fields or unlimited, field_size or unlimited
        limits = {
            "line_limit": line,
            "fields_limit": fields,
            "field_size_limit": field_size,
            "head_bytes": line + 2 + min(fields, 32768) * (field_size + 2) + 2,
        }
        return type(cls.__name__, (cls,), limits)

    def data_received(self, data: bytes) -> None:
        if self.in_head:
            if self.head_read > self.head_bytes:
                self.refuse(
                    431,
                    "Request Header Fields Too Large",
                    f"the request head is over {self.head_bytes} bytes",
                )
                return
            self.head_read += len(data)
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.refusal, self.head_read, self.in_head, self.fields = None, 0, True, 0

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > self.line_limit:
            self.stop(
                414,
                "Request-URI Too Long",
                f"the request line is too large ({len(self.url)}+ > {self.line_limit})",
            )

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        self.fields += 1
        if self.fields > self.fields_limit:
            self.stop(
                431,
                "Request Header Fields Too Large",
                f"more than {self.fields_limit} header fields",
            )
        if len(name) + len(value) + 2 > self.field_size_limit:
            self.stop(
                431,
                "Request Header Fields Too Large",
                f"a header field is too large ({len(name) + len(value) + 2} > "
                f"{self.field_size_limit})",
            )

    def on_headers_complete(self) -> None:
        self.in_head = False
        super().on_headers_complete()

    def stop(self, status: int, reason: str, message: str) -> None:
        self.refusal = (status, reason, message)
        # httptools raises HttpParserCallbackError; data_received answers
        raise HeadTooLarge(message)

    # uvicorn's answer to anything the parser refused
    def send_400_response(self, msg: str) -> None:
        status, reason, message = self.refusal or (400, "Bad Request", msg)
        self.refuse(status, reason, message)

    def refuse(self, status: int, reason: str, message: str) -> None:
        self.transport.write(render(status, reason, f"{reason.lower()}: {message[:MESSAGE_LIMIT]}"))
        self.transport.close()


class UvicornWorker(_UvicornWorker):  # type: ignore[misc]
    """uvicorn-worker's worker: no uvicorn access log, no request dropped by a graceful stop,
    gunicorn's limits on the request head, JSON errors."""

    CONFIG_KWARGS: dict[str, Any] = {"loop": "auto", "http": "auto", "access_log": False}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cfg = self.cfg
        self.config.http = LimitedHttpProtocol.with_limits(
            cfg.limit_request_line, cfg.limit_request_fields, cfg.limit_request_field_size
        )

    def load_wsgi(self) -> None:
        super().load_wsgi()
        check_asgi_app(self.wsgi, self.log)

    async def _serve(self) -> None:  # uvicorn_worker's, with GracefulServer
        self.config.app = self.wsgi
        server = GracefulServer(config=self.config)
        server.grpc_front = getattr(self, "grpc_front", None)
        self._install_sigquit_handler()
        await server.serve(sockets=self.sockets)
        if not server.started:
            sys.exit(WORKER_BOOT_ERROR)


class AsgiWorker(_GunicornAsgiWorker):  # type: ignore[misc]
    """gunicorn's native asgi worker: its app also as ``worker.wsgi``; SIGTERM stops accepting at
    once."""

    def load_wsgi(self) -> None:
        super().load_wsgi()
        check_asgi_app(self.asgi, self.log)
        self.wsgi = self.asgi

    def handle_exit_signal(self) -> None:
        front = getattr(self, "grpc_front", None)
        if front is not None:
            front.begin_stop()
        super().handle_exit_signal()
        for server in self.servers:
            server.close()
