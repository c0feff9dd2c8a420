"""Every Prometheus metric, declared once, and the ``/metrics`` exposition.

Under gunicorn the workers are separate processes, so the metrics use prometheus_client's
multiprocess mode: ``PROMETHEUS_MULTIPROC_DIR`` is set by gunicorn.conf.py before this module is
imported anywhere, the master wipes the directory at start (``on_starting``) and marks dead workers
(``child_exit``; the model pool's arbiter marks its processes, ``dirty_worker_exit``), and
``/metrics`` merges every worker's files, so totals are right whichever worker answers. Without
that variable (tests with Flask's client) the metrics are per process.

# design: in multiprocess mode every increment is a locked write into an mmap'd file, and a
# request makes seven of them (a counter and three histograms): about 35 us, a quarter of what the
# direct route costs without the model. The per-request observations therefore go to a ``Tally``,
# plain per-process sums that a daemon thread adds into the Prometheus values once per
# ``FLUSH_SECONDS``; ``/metrics`` flushes its own worker first, ``worker_exit`` flushes the last
# second of a worker that stops. So a scrape can lag other workers by up to a second, and a
# SIGKILLed worker loses at most its last second of counts.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from bisect import bisect_left
from collections.abc import Iterator
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
from prometheus_client.core import GaugeMetricFamily

from serving.observability.memory import server_memory

MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

REQUESTS = Counter(
    "serving_requests_total", "HTTP requests answered", ["endpoint", "method", "status"]
)
REQUEST_LATENCY = Histogram(
    "serving_request_latency_seconds",
    "Time from request start to response, per endpoint",
    ["endpoint"],
    buckets=LATENCY_BUCKETS,
)
# With the model pool these two are the pool processes' (its model calls, its batches of every HTTP
# worker's requests), and each HTTP worker's call to the pool is POOL_CALL_SECONDS.
INFERENCE_LATENCY = Histogram(
    "serving_inference_latency_seconds",
    "Time the model took per call (one batch)",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "serving_batch_size", "Samples per model call", ["model"], buckets=BATCH_BUCKETS
)
POOL_CALL_SECONDS = Histogram(
    "serving_pool_call_seconds",
    "Time an HTTP worker's request waited for the model pool: the pool's queue and its batch",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
QUEUE_DEPTH = Gauge(
    "serving_queue_depth",
    "Requests waiting for the model thread (batched mode) or in the model pool's queue (sampled"
    " once a second)",
    ["model"],
    multiprocess_mode="livesum",
)
REJECTED = Counter("serving_rejected_requests_total", "Requests refused, by reason", ["reason"])
MODEL_LOAD_SECONDS = Gauge(
    "serving_model_load_seconds",
    "Seconds the last model load took in a worker",
    ["model"],
    multiprocess_mode="max",
)
MODEL_CHANGES = Counter(
    "serving_model_changes_total",
    "Model versions loaded or unloaded while serving, by outcome",
    ["action", "outcome"],
)
MODEL_INFO = Gauge(
    "serving_model_info",
    "The model versions each live worker serves (1; 0 once unloaded)",
    ["model", "version", "backend", "framework", "mode"],
    multiprocess_mode="liveall",
)
# canary and shadow traffic (serving.runtime.traffic)
TRAFFIC_WEIGHT = Gauge(
    "serving_traffic_weight",
    "Percent of a model's unversioned requests each version answers under its traffic rule"
    " (role stable or candidate); for the shadow, the percent of requests it gets a copy of",
    ["model", "version", "role"],
    multiprocess_mode="livemostrecent",
)
TRAFFIC_FALLBACKS = Counter(
    "serving_traffic_fallbacks_total",
    "Requests a candidate version failed that the stable version then answered",
    ["model", "version"],
)
TRAFFIC_ROLLBACKS = Counter(
    "serving_traffic_rollbacks_total",
    "Candidate versions rolled back automatically (weight set to 0), by reason: errors or latency",
    ["model", "version", "reason"],
)
SHADOW_SAMPLES = Counter(
    "serving_shadow_samples_total",
    "Samples a shadow version answered, compared with the stable version's answer: agree or"
    " disagree (the most probable class)",
    ["model", "version", "result"],
)
SHADOW_LATENCY = Histogram(
    "serving_shadow_latency_seconds",
    "Latency of shadowed requests: the stable version's model call (arm stable) and the shadow's"
    " copy of it (arm shadow)",
    ["model", "version", "arm"],
    buckets=LATENCY_BUCKETS,
)
SHADOW_DROPPED = Counter(
    "serving_shadow_dropped_total",
    "Shadow copies dropped because the worker's shadow queue was full",
    ["model"],
)
PAYLOAD_RECORDS = Counter(
    "serving_payload_records_total",
    "Payload records (SERVING_PAYLOAD_LOG) by outcome: written, dropped (the writer's buffer was"
    " full) or failed (the sink refused or could not be reached)",
    ["outcome"],
)
# Per model version, for Triton's statistics extension (serving.protocol.v2.triton) as much as for
# dashboards: inference requests that reached the model, by outcome, and the seconds they took from
# arrival to answer; the seconds they waited in the batching queue; when the last one was answered.
MODEL_REQUESTS = Counter(
    "serving_model_requests_total",
    "Inference requests (and shadow copies) that reached a model version, by outcome: ok, error"
    " (5xx: the model failed or its deadline passed), refused (503: queue full, stopping)",
    ["model", "outcome"],
)
MODEL_REQUEST_SECONDS = Counter(
    "serving_model_request_seconds_total",
    "Seconds those requests took, arrival to answer, by outcome",
    ["model", "outcome"],
)
QUEUE_SECONDS = Counter(
    "serving_queue_seconds_total",
    "Seconds requests waited in the batching queue before their batch ran (batched mode)",
    ["model"],
)
LAST_INFERENCE = Gauge(
    "serving_model_last_inference_timestamp_seconds",
    "When a version last answered an inference request (Unix time, to the second)",
    ["model"],
    multiprocess_mode="max",
)
# The gRPC front's calls (serving.fronts.grpc), by method and status code.
GRPC_REQUESTS = Counter("serving_grpc_requests_total", "gRPC calls answered", ["method", "code"])
GRPC_LATENCY = Histogram(
    "serving_grpc_request_latency_seconds",
    "Time from a gRPC call's start to its answer, per method",
    ["method"],
    buckets=LATENCY_BUCKETS,
)

FLUSH_SECONDS = 1.0
log = logging.getLogger("serving")


class Tally:
    """Per-process sums of metric increments, added into the Prometheus values by ``flush``."""

    def __init__(self) -> None:
        self._forget()
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        """(Re)start empty: in a fresh child the parent's locks may have been held at the fork,
        and its sums and flush thread are its own."""
        self._lock = threading.Lock()  # guards _pending: held for a few dict operations per request
        # one flush at a time, so a returned flush() has been applied
        self._flush_lock = threading.Lock()
        self._pending: dict[Any, float] = {}
        self._flushing = False  # whether this process has started its flush thread

    def add(self, value: Any, amount: float) -> None:
        """Add ``amount`` to a Prometheus value (a counter's or one histogram bucket's) at the
        next flush."""
        with self._lock:
            pending = self._pending
            pending[value] = pending.get(value, 0.0) + amount
        if not self._flushing:
            self._start_flusher()

    def inc(self, counter: Any, amount: float = 1.0) -> None:
        """``counter.inc(amount)`` (a labelled Counter child), deferred."""
        self.add(counter._value, amount)

    def observe(self, histogram: Any, amount: float) -> None:
        """``histogram.observe(amount)`` (a labelled Histogram child), deferred: its bucket and
        its sum."""
        # the first bucket with amount <= bound
        index = bisect_left(histogram._upper_bounds, amount)
        with self._lock:
            pending = self._pending
            if index < len(histogram._buckets):  # NaN fits no bucket, as in Histogram.observe
                bucket = histogram._buckets[index]
                pending[bucket] = pending.get(bucket, 0.0) + 1.0
            total = histogram._sum
            pending[total] = pending.get(total, 0.0) + amount
        if not self._flushing:
            self._start_flusher()

    def flush(self) -> None:
        """Add every pending sum into its Prometheus value; when this returns, they are visible."""
        with self._flush_lock:
            with self._lock:
                pending, self._pending = self._pending, {}
            for value, amount in pending.items():
                value.inc(amount)

    def _start_flusher(self) -> None:
        with self._lock:
            if self._flushing:
                return
            # also when the thread cannot start: /metrics and worker exit still flush
            self._flushing = True
        try:
            threading.Thread(target=self._flush_forever, name="metrics-flush", daemon=True).start()
        except RuntimeError:
            log.warning(
                "cannot start the metrics flush thread; metrics are flushed by /metrics and at "
                "exit only"
            )

    def _flush_forever(self) -> None:
        stop = threading.Event()
        while not stop.wait(FLUSH_SECONDS):
            try:
                self.flush()
            except Exception:  # never let the thread die: the next second retries with new sums
                log.exception("flushing metrics failed")


TALLY = Tally()
_REQUEST_CHILDREN: dict[tuple[str, str, int], tuple[Any, Any]] = {}


def observe_request(endpoint: str, method: str, status: int, seconds: float) -> None:
    """Count one answered request and its latency (label children cached: this runs per request)."""
    key = (endpoint, method, status)
    children = _REQUEST_CHILDREN.get(key)
    if children is None:
        children = (
            REQUESTS.labels(endpoint, method, str(status)),
            REQUEST_LATENCY.labels(endpoint),
        )
        _REQUEST_CHILDREN[key] = children
    TALLY.inc(children[0])
    TALLY.observe(children[1], seconds)


class ModelRequests:
    """The request counts of one model version: its outcomes, durations and last answer time."""

    OUTCOMES = ("ok", "error", "refused")

    def __init__(self, model: str) -> None:
        self._children = {
            outcome: (
                MODEL_REQUESTS.labels(model, outcome),
                MODEL_REQUEST_SECONDS.labels(model, outcome),
            )
            for outcome in self.OUTCOMES
        }
        self._last = LAST_INFERENCE.labels(model)
        self._last_second = 0

    def observe(self, outcome: str, seconds: float) -> None:
        """Count one request: its outcome (ok, error or refused) and duration; the time of the
        last answer at most once a second (a gauge write is a locked file write in multiprocess
        mode)."""
        count, total = self._children[outcome]
        TALLY.inc(count)
        TALLY.inc(total, seconds)
        now = int(time.time())
        if now != self._last_second:
            self._last_second = now
            self._last.set(now)


_RPC_CHILDREN: dict[tuple[str, str], tuple[Any, Any]] = {}


def observe_rpc(method: str, code: str, seconds: float) -> None:
    """Count one answered gRPC call and its latency (label children cached)."""
    key = (method, code)
    children = _RPC_CHILDREN.get(key)
    if children is None:
        children = (GRPC_REQUESTS.labels(method, code), GRPC_LATENCY.labels(method))
        _RPC_CHILDREN[key] = children
    TALLY.inc(children[0])
    TALLY.observe(children[1], seconds)


def sample_values(*names: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The current value of every sample of the named metrics, summed across workers in
    multiprocess mode: ``(sample name, sorted labels) -> value`` (this worker's pending counts
    flushed first)."""
    TALLY.flush()
    if MULTIPROCESS:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        families = registry.collect()
    else:
        families = REGISTRY.collect()
    wanted = set(names)
    values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in families:
        # a counter's family is named without its _total suffix
        if family.name not in wanted and f"{family.name}_total" not in wanted:
            continue
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            values[key] = values.get(key, 0.0) + sample.value
    return values


class ProcessMemoryCollector:
    """``serving_process_memory_bytes``: RSS, PSS and USS of every process of the server, read
    from /proc at scrape time (a few hundred microseconds per process), so the sum of PSS over
    ``pid`` is what the whole server costs (docs/operations.md, sizing)."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "serving_process_memory_bytes",
            "Resident memory of each server process (master, workers, model pool) by kind: rss"
            " counts shared pages in full, pss splits them between the processes sharing them,"
            " uss is the process's private pages",
            labels=["pid", "role", "kind"],
        )
        for process in server_memory():
            for kind in ("rss", "pss", "uss"):
                family.add_metric([str(process.pid), process.role, kind], getattr(process, kind))
        yield family


_MEMORY = ProcessMemoryCollector()
REGISTRY.register(_MEMORY)
#: Collectors computed at scrape time, beside the multiprocess files: the memory gauge, drift.
_SCRAPED: list[Any] = [_MEMORY]


def register_collector(collector: Any) -> None:
    """Add a collector that computes its metrics at scrape time (every worker's, in one answer)."""
    _SCRAPED.append(collector)
    REGISTRY.register(collector)


def multiprocess_directory() -> str | None:
    """prometheus_client's multiprocess directory, where per-worker state is merged (or None)."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def exposition() -> tuple[bytes, str]:
    """The Prometheus text for every worker (multiprocess) or this process, and its content type."""
    TALLY.flush()
    if MULTIPROCESS:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        for collector in _SCRAPED:
            registry.register(collector)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def mark_worker_dead(pid: int) -> None:
    """Called by the master when a worker exits, so its live gauges stop counting."""
    if MULTIPROCESS:
        multiprocess.mark_process_dead(pid)
