"""Real receivers for the observability tests and benchmarks: OTLP/HTTP traces and HTTP sinks.

``Receiver`` is an HTTP server on a free loopback port that records every POST it gets (path,
headers, body) and answers 200. What an OpenTelemetry exporter sends to ``/v1/traces`` is decoded
with ``opentelemetry-proto`` (``ExportTraceServiceRequest``, gzip or not) into ``ReceivedSpan``
values, as an OpenTelemetry Collector's OTLP receiver would decode it; a payload log's CloudEvents
sink is the same server, read through ``posts``. (The Collector itself is not packaged for this
machine: no Debian or PyPI package ships it, and building it needs a Go toolchain.)
"""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Post:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as the receiver decoded it (ids in hex)."""

    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    links: tuple[tuple[str, str], ...]  # (trace id, span id) of each link
    resource: dict[str, Any]


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    return None if kind is None else getattr(any_value, kind)


def decode_traces(body: bytes) -> list[ReceivedSpan]:
    """The spans of one OTLP/HTTP protobuf export request."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans = []
    for resource_spans in request.resource_spans:
        resource = {kv.key: _value(kv.value) for kv in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    ReceivedSpan(
                        span.trace_id.hex(),
                        span.span_id.hex(),
                        span.parent_span_id.hex(),
                        span.name,
                        span.kind,
                        span.start_time_unix_nano,
                        span.end_time_unix_nano,
                        {kv.key: _value(kv.value) for kv in span.attributes},
                        tuple((link.trace_id.hex(), link.span_id.hex()) for link in span.links),
                        resource,
                    )
                )
    return spans


class Receiver:
    """Records POSTs on ``url``; ``with Receiver() as r:`` starts and stops it."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self._posts: list[Post] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                headers = {key.lower(): value for key, value in self.headers.items()}
                with receiver._lock:
                    receiver._posts.append(Post(self.path, headers, body))
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def posts(self, path: str | None = None) -> list[Post]:
        with self._lock:
            return [post for post in self._posts if path is None or post.path == path]

    def spans(self) -> list[ReceivedSpan]:
        """Every span exported to ``/v1/traces`` so far."""
        return [span for post in self.posts("/v1/traces") for span in decode_traces(post.body)]

    def wait_for(self, found: Callable[[Receiver], Any], timeout_s: float = 15.0) -> Any:
        """Poll until ``found(self)`` is truthy and return it (AssertionError after
        ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = found(self)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"the receiver did not get what was expected in {timeout_s}s")
            time.sleep(0.05)
