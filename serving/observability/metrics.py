"""Every Prometheus metric, declared once, and the ``/metrics`` exposition.

Under gunicorn the workers are separate processes, so the metrics use prometheus_client's
multiprocess mode: ``PROMETHEUS_MULTIPROC_DIR`` is set by gunicorn.conf.py before this module is
imported anywhere, the master wipes the directory at start (``on_starting``) and marks dead workers
(``child_exit``), and ``/metrics`` merges every worker's files, so totals are right whichever worker
answers. Without that variable (tests with Flask's client) the metrics are per process.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

REQUESTS = Counter("serving_requests_total", "HTTP requests answered", ["endpoint", "method", "status"])
REQUEST_LATENCY = Histogram(
    "serving_request_latency_seconds", "Time from request start to response, per endpoint", ["endpoint"],
    buckets=LATENCY_BUCKETS,
)
INFERENCE_LATENCY = Histogram(
    "serving_inference_latency_seconds", "Time the model took per call (one batch)", ["model"],
    buckets=LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram("serving_batch_size", "Samples per model call", ["model"], buckets=BATCH_BUCKETS)
QUEUE_DEPTH = Gauge(
    "serving_queue_depth", "Requests waiting for the model thread (batched mode)", ["model"],
    multiprocess_mode="livesum",
)
REJECTED = Counter("serving_rejected_requests_total", "Requests refused, by reason", ["reason"])
MODEL_LOAD_SECONDS = Gauge(
    "serving_model_load_seconds", "Seconds the last model load took in a worker", ["model"],
    multiprocess_mode="max",
)
MODEL_INFO = Gauge(
    "serving_model_info", "The model each live worker serves (value 1)",
    ["model", "version", "backend", "framework", "mode"], multiprocess_mode="liveall",
)

_REQUEST_CHILDREN: dict[tuple[str, str, int], tuple[Any, Any]] = {}


def observe_request(endpoint: str, method: str, status: int, seconds: float) -> None:
    """Count one answered request and its latency (label children cached: this runs per request)."""
    key = (endpoint, method, status)
    children = _REQUEST_CHILDREN.get(key)
    if children is None:
        children = (REQUESTS.labels(endpoint, method, str(status)), REQUEST_LATENCY.labels(endpoint))
        _REQUEST_CHILDREN[key] = children
    children[0].inc()
    children[1].observe(seconds)


def exposition() -> tuple[bytes, str]:
    """The Prometheus text for every worker (multiprocess) or this process, and its content type."""
    if MULTIPROCESS:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def mark_worker_dead(pid: int) -> None:
    """Called by the master when a worker exits, so its live gauges stop counting."""
    if MULTIPROCESS:
        multiprocess.mark_process_dead(pid)
