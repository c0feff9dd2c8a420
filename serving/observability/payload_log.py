"""Payload logging: sampled records of inference requests and answers, written off the request path.

# design: the fronts' middleware (``serving.fronts.observed``) hands every finished inference
# request to ``PayloadLog.offer`` as an ``Exchange`` (references only). ``offer`` draws the sample
# (``SERVING_PAYLOAD_LOG_RATE``, overridden per status by ``SERVING_PAYLOAD_LOG_STATUS_RATES``) and
# puts the exchange on a bounded queue with ``put_nowait``: a full queue drops it and counts it
# (``serving_payload_records_total{outcome="dropped"}``), so a slow disk or a dead sink never holds
# a request, and nothing raised here reaches one. One writer thread per worker builds the records
# (``serving.observability.payload_record``: parsing, summaries, redaction, the cap) and writes
# them: one JSON object per line to stdout or a file (opened with O_APPEND, so every worker's lines
# stay whole), or two CloudEvents per exchange to an HTTP sink in KServe's logger format (binary
# content mode: ``ce-*`` headers, the request's then the answer's body as data; the answer only for
# a 200, as KServe does). Worker exit drains the queue (``close``).
"""

from __future__ import annotations

import http.client
import logging
import os
import queue
import random
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import orjson

from serving.config import Settings
from serving.observability import metrics, observed
from serving.observability.payload_record import Exchange, RecordOptions, build_record

log = logging.getLogger("serving")
CE_REQUEST = "org.kubeflow.serving.inference.request"
CE_RESPONSE = "org.kubeflow.serving.inference.response"
SINK_TIMEOUT_S = 2.0
WARN_EVERY_S = 60.0


def status_rates(text: str) -> dict[str, float]:
    """``5xx=1, 404=0.5`` as {"5xx": 1.0, "404": 0.5} (validated by the setting's pattern)."""
    rates = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        status, _, rate = item.partition("=")
        rates[status.strip().lower()] = float(rate)
    return rates


class PayloadLog:
    """One worker's sampler, buffer and writer of payload records."""

    def __init__(self, settings: Settings, write: Callable[[Exchange], None] | None = None) -> None:
        self.rate = settings.payload_log_rate
        self.rates = status_rates(settings.payload_log_status_rates)
        self.options = RecordOptions(
            settings.payload_log_mode,
            settings.payload_log_max_bytes,
            frozenset(
                name.strip().lower() for name in settings.payload_log_redact.split(",") if name
            ),
            settings.payload_log_thumbnails,
        )
        self.target = settings.payload_log
        self._capacity = settings.payload_log_queue
        self._write = write or self._sink(settings)
        self._counts = {
            outcome: metrics.PAYLOAD_RECORDS.labels(outcome)
            for outcome in ("written", "dropped", "failed")
        }
        self._reset()
        os.register_at_fork(after_in_child=self._reset)
        observed.at_exit(self.close)

    def _reset(self) -> None:
        """(Re)start empty: a forked child has none of its parent's queue or thread."""
        self._queue: queue.Queue[Exchange | None] = queue.Queue(self._capacity)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._warned = -WARN_EVERY_S

    # -- the request side --------------------------------------------------------------------------
    def rate_for(self, status: int) -> float:
        """The sampling rate of an answer with ``status``: its own, its class's, else the rate."""
        code = str(status)
        rate = self.rates.get(code)
        if rate is None:
            rate = self.rates.get(code[0] + "xx", self.rate)
        return rate

    def wanted(self, status: int) -> bool:
        rate = self.rate_for(status)
        return rate >= 1.0 or (rate > 0.0 and random.random() < rate)

    def may_record(self) -> bool:
        """Whether any answer could be recorded (the middleware captures bodies only then)."""
        return self.rate > 0.0 or any(rate > 0.0 for rate in self.rates.values())

    def offer(self, exchange: Exchange) -> None:
        """Queue ``exchange`` for writing when it is sampled; never blocks, never raises."""
        try:
            if not self.wanted(exchange.status):
                return
            if self._thread is None:
                self._start()
            self._queue.put_nowait(exchange)
        except queue.Full:
            metrics.TALLY.inc(self._counts["dropped"])
        except Exception:  # a record is never worth a request
            metrics.TALLY.inc(self._counts["dropped"])
            log.exception("payload record dropped")

    # -- the writer --------------------------------------------------------------------------------
    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="payload-log", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            exchange = self._queue.get()
            if exchange is None:
                return
            try:
                self._write(exchange)
            except Exception as exc:
                metrics.TALLY.inc(self._counts["failed"])
                now = time.monotonic()
                if now - self._warned >= WARN_EVERY_S:  # a dead sink: a line a minute, not a record
                    self._warned = now
                    log.warning("payload records not written (counted as failed): %s", exc)
            else:
                metrics.TALLY.inc(self._counts["written"])

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what is queued (up to ``timeout_s``), then stop the writer."""
        thread = self._thread
        if thread is None:
            return
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            return
        thread.join(timeout_s)
        self._thread = None
        close = getattr(self._write, "__self__", None)
        if close is not None and hasattr(close, "close"):
            close.close()

    # -- sinks -------------------------------------------------------------------------------------
    def _sink(self, settings: Settings) -> Callable[[Exchange], None]:
        target = settings.payload_log
        if target.startswith(("http://", "https://")):
            return CloudEventSink(target, self.options).write
        return LineSink(target, self.options).write


class LineSink:
    """One JSON object per line, to stdout or appended to a file."""

    def __init__(self, target: str, options: RecordOptions) -> None:
        self.options = options
        self.target = target
        self._fd: int | None = None

    def write(self, exchange: Exchange) -> None:
        line = orjson.dumps(build_record(exchange, self.options)) + b"\n"
        if self.target == "stdout":
            stream = sys.stdout.buffer if hasattr(sys.stdout, "buffer") else None
            if stream is None:
                sys.stdout.write(line.decode())
            else:
                stream.write(line)
            sys.stdout.flush()
            return
        if self._fd is None:
            self._fd = os.open(self.target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        os.write(self._fd, line)  # one write per line: O_APPEND keeps every worker's lines whole

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class CloudEventSink:
    """KServe's logger events: HTTP POSTs in CloudEvents binary mode, one per request and one per
    200 answer, sharing the request's id as ``ce-id``."""

    def __init__(self, url: str, options: RecordOptions) -> None:
        parts = urlsplit(url)
        self.https = parts.scheme == "https"
        self.host = parts.hostname or "localhost"
        self.port = parts.port
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.options = options
        self.source = f"http://{os.uname().nodename}/serving"
        self._connection: http.client.HTTPConnection | None = None

    def write(self, exchange: Exchange) -> None:
        record = build_record(exchange, self.options)
        events = []
        if "request" in record:
            events.append((CE_REQUEST, record["request"]["body"]))
        if "response" in record and exchange.status == 200:
            events.append((CE_RESPONSE, record["response"]["body"]))
        for kind, data in events:
            self._post(self._headers(exchange, kind), orjson.dumps(data))

    def _headers(self, exchange: Exchange, kind: str) -> dict[str, str]:
        name, _, version = exchange.model.partition(":")
        return {
            "Content-Type": "application/json",
            "ce-specversion": "1.0",
            "ce-id": exchange.request_id,
            "ce-type": kind,
            "ce-source": self.source,
            "ce-time": datetime.fromtimestamp(exchange.time, tz=UTC).isoformat(),
            "ce-inferenceservicename": name,
            "ce-namespace": "",
            "ce-component": "predictor",
            "ce-endpoint": "",
            "ce-metadata": "{}",
            "ce-modelversion": version,
            "ce-statuscode": str(exchange.status),
        }

    def _post(self, headers: dict[str, str], body: bytes) -> None:
        for attempt in (1, 2):  # a kept-alive connection the sink closed: one fresh try
            connection = self._connection or self._connect()
            try:
                connection.request("POST", self.path, body, headers)
                answer = connection.getresponse()
                answer.read()
            except (OSError, http.client.HTTPException):
                connection.close()
                self._connection = None
                if attempt == 2:
                    raise
                continue
            if answer.status >= 300:
                self.close()
                raise OSError(f"the payload sink answered {answer.status}")
            return

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _connect(self) -> http.client.HTTPConnection:
        kind = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        self._connection = kind(self.host, self.port, timeout=SINK_TIMEOUT_S)
        return self._connection


_lock = threading.Lock()
_instances: dict[tuple[Any, ...], PayloadLog] = {}


def for_settings(settings: Settings) -> PayloadLog | None:
    """This process's ``PayloadLog`` for these settings; None when ``SERVING_PAYLOAD_LOG`` is
    empty."""
    if not settings.payload_log:
        return None
    key = tuple(
        getattr(settings, name)
        for name in settings.__dataclass_fields__
        if name.startswith("payload")
    )
    with _lock:
        found = _instances.get(key)
        if found is None:
            found = _instances[key] = PayloadLog(settings)
        return found
