"""Structured logging with request ids.

Every record of the ``serving`` logger carries ``request_id`` (the current request's id inside a
request, ``-`` outside one). ``SERVING_LOG_FORMAT=json`` writes one JSON object per line. Records go
to stderr, which gunicorn points at its error log file when one is configured (capture_output).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson

from serving.config import Settings
from serving.observability.context import CURRENT_REQUEST

TEXT_FORMAT = "[%(asctime)s] [%(process)d] [%(levelname)s] [%(request_id)s] %(message)s"
_QUOTED = frozenset('"\\')
_STANDARD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {
    "message",
    "asctime",
    "request_id",
}


def escape(text: str) -> str:
    """``text`` safe for one text log line: unprintable characters, quotes and backslashes escaped.

    A path like ``/x%0A[2026-...] [INFO] ...`` must not forge a second log line, ``%1B`` must not
    reach an operator's terminal as an escape sequence, and ``%E2%80%AE`` (U+202E, a bidi override)
    must not make ``/xgnp.exe`` read as ``/xexe.png``: every character ``str.isprintable`` refuses
    (C0 and C1 controls, format controls of category Cf, line and paragraph separators, other
    spaces than the plain one) is written as its code.
    """
    if text.isprintable() and '"' not in text and "\\" not in text:
        return text
    return "".join(
        _escaped(char) if not char.isprintable() or char in _QUOTED else char for char in text
    )


def _escaped(char: str) -> str:
    code = ord(char)
    if code < 256:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


class AccessLog:
    """One line per request, in the same text or JSON format as the other log lines.

    Written straight to the stream rather than through ``logging``: at thousands of requests per
    second per core, a LogRecord, a filter and a Formatter per line cost more than the model call.
    """

    def __init__(self, settings: Settings, stream: TextIO | None = None) -> None:
        self.enabled = (
            settings.access_log and logging.getLevelName(settings.log_level.upper()) <= logging.INFO
        )
        self.json = settings.log_format == "json"
        self._stream = stream
        self._lock = threading.Lock()
        self._second = -1
        self._stamp = ""

    def _timestamp(self, now: float) -> str:
        second = int(now)
        if second != self._second:  # strftime once per second, not once per line
            self._second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(second))
        return self._stamp

    def write(
        self,
        request_id: str,
        method: str,
        path: str,
        status: int,
        latency_ms: float,
        model: str,
        batch_size: int | None,
    ) -> None:
        """Write one access line (a no-op when access logging is off)."""
        if not self.enabled:
            return
        now = time.time()
        if self.json:
            line = (
                orjson.dumps(
                    {
                        "time": datetime.fromtimestamp(now, tz=UTC).isoformat(
                            timespec="milliseconds"
                        ),
                        "level": "info",
                        "pid": os.getpid(),
                        "request_id": request_id,
                        "message": f"{method} {path} {status}",
                        "method": method,
                        "path": path,
                        "status": status,
                        "latency_ms": round(latency_ms, 3),
                        "model": model,
                        "batch_size": batch_size,
                    }
                ).decode()
                + "\n"
            )
        else:
            request = f"{escape(method)} {escape(path)}"
            line = (
                f"[{self._timestamp(now)}] [{os.getpid()}] [INFO] [{request_id}]"
                f' "{request}" {status}'
                f" {latency_ms:.2f}ms model={model} "
                f"batch={'-' if batch_size is None else batch_size}\n"
            )
        stream = self._stream or sys.stderr
        try:
            with self._lock:
                stream.write(line)
        # a full disk or closed stream must not fail the request it describes
        except (OSError, ValueError):
            pass


class RequestIdFilter(logging.Filter):
    """Stamps each record with the id of the request being served by this thread."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            request = CURRENT_REQUEST.get()
            record.request_id = request.request_id if request is not None else "-"
        return True


class TextFormatter(logging.Formatter):
    """The text format, with each message escaped (``escape``); tracebacks keep their lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        record.message = escape(record.message)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, pid, request id, message and any ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, tz=UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "pid": record.process,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure_logging(settings: Settings, stream: TextIO | None = None) -> logging.Logger:
    """Give the ``serving`` logger one handler with the configured format (idempotent per
    process)."""
    logger = logging.getLogger("serving")
    logger.setLevel(settings.log_level.upper())
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter(TEXT_FORMAT, datefmt="%Y-%m-%d %H:%M:%S %z"))
    handler.addFilter(RequestIdFilter())
    logger.addHandler(handler)
    logger.debug("logging configured in pid %d", os.getpid())
    return logger


def gunicorn_logger_class(settings: Settings) -> type | None:
    """A gunicorn ``logger_class`` writing gunicorn's own lines as JSON too, when the format is
    JSON.

    gunicorn formats its master and worker lines ("Listening at", "Booting worker", timeouts) with
    its own text formatter; with ``SERVING_LOG_FORMAT=json`` a log shipper should get one format
    only.
    """
    if settings.log_format != "json":
        return None
    from gunicorn.glogging import Logger

    class JsonGunicornLogger(Logger):  # type: ignore[misc]
        def setup(self, cfg: Any) -> None:
            super().setup(cfg)
            # re-run on every reload, after gunicorn's own setup
            for handler in self.error_log.handlers:
                handler.setFormatter(JsonFormatter())

    return JsonGunicornLogger
