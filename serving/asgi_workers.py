"""The two ASGI workers the front runs under: gunicorn.conf.py selects one with SERVING_FRONT=asgi.

- ``UvicornWorker``: the maintained ``uvicorn_worker.UvicornWorker`` (uvloop and httptools when
  installed), with two changes. uvicorn's own access log is off: the app writes one access line per
  request, as on WSGI, and uvicorn's would cost a LogRecord per request that gunicorn's disabled access
  log then drops. And a graceful stop (SIGTERM, SIGHUP, max_requests) no longer drops requests:
  uvicorn's ``Server.shutdown`` closes every connection whose request has not been parsed yet, so a
  client that connected just before the stop, or whose request is still in flight on the wire, gets a
  reset. Measured under the reliability tests' load: 23 of 824 requests failed across one SIGHUP and
  a few max_requests recyclings. Here the listeners close first and such connections get
  ``FIRST_REQUEST_GRACE_S`` for their request to arrive; it is then answered with Connection: close.
- ``AsgiWorker``: gunicorn 27's native ``asgi`` worker, with its app also reachable as ``worker.wsgi``
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
from uvicorn.server import Server
from uvicorn_worker import UvicornWorker as _UvicornWorker

WORKER_BOOT_ERROR = 3  # gunicorn's Arbiter.WORKER_BOOT_ERROR: the master stops instead of respawning
#: How long a stopping uvicorn worker waits for the request of a connection it accepted but has not read.
FIRST_REQUEST_GRACE_S = 1.0


def check_asgi_app(app: Any, log: Any) -> None:
    """Exit with the boot-error code when ``app`` is this project's WSGI (Flask) app, not an ASGI one."""
    extensions = getattr(app, "extensions", None)
    if isinstance(extensions, dict) and "serving" in extensions and hasattr(app, "wsgi_app"):
        log.error("SERVING_FRONT=asgi runs an ASGI app: serve asgi_server:app (gunicorn -c gunicorn.conf.py"
                  " asgi_server:app), or unset SERVING_FRONT to serve flask_server:app")
        sys.exit(WORKER_BOOT_ERROR)


class GracefulServer(Server):  # type: ignore[misc]
    """uvicorn's server, except that a stop answers the connections it accepted but had not read yet."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()  # stop accepting first; uvicorn's shutdown closes them again (idempotent)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FIRST_REQUEST_GRACE_S
        while loop.time() < deadline and any(getattr(connection, "cycle", None) is None
                                             for connection in self.server_state.connections):
            await asyncio.sleep(0.02)
        await super().shutdown(sockets)


class UvicornWorker(_UvicornWorker):  # type: ignore[misc]
    """uvicorn-worker's worker: no uvicorn access log, no request dropped by a graceful stop."""

    CONFIG_KWARGS: dict[str, Any] = {"loop": "auto", "http": "auto", "access_log": False}

    def load_wsgi(self) -> None:
        super().load_wsgi()
        check_asgi_app(self.wsgi, self.log)

    async def _serve(self) -> None:  # uvicorn_worker's, with GracefulServer
        self.config.app = self.wsgi
        server = GracefulServer(config=self.config)
        self._install_sigquit_handler()
        await server.serve(sockets=self.sockets)
        if not server.started:
            sys.exit(WORKER_BOOT_ERROR)


class AsgiWorker(_GunicornAsgiWorker):  # type: ignore[misc]
    """gunicorn's native asgi worker: its app also as ``worker.wsgi``; SIGTERM stops accepting at once."""

    def load_wsgi(self) -> None:
        super().load_wsgi()
        check_asgi_app(self.asgi, self.log)
        self.wsgi = self.asgi

    def handle_exit_signal(self) -> None:
        super().handle_exit_signal()
        for server in self.servers:
            server.close()
