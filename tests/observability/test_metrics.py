"""The metrics tally: deferred observations land exactly as prometheus_client's own would."""

from __future__ import annotations

import math
import time

from prometheus_client import CollectorRegistry, Counter, Histogram

from serving.observability.metrics import LATENCY_BUCKETS, Tally


def samples(registry: CollectorRegistry, label: str) -> dict[tuple[str, str], float]:
    """(sample name, le) -> value for the children labelled ``label``."""
    return {(s.name, s.labels.get("le", "")): s.value for metric in registry.collect() for s in metric.samples
            if s.labels.get("way") == label and not s.name.endswith("_created")}


def test_deferred_observations_equal_direct_ones_after_a_flush() -> None:
    registry = CollectorRegistry()
    histogram = Histogram("latency_seconds", "h", ["way"], buckets=LATENCY_BUCKETS, registry=registry)
    counter = Counter("answered_total", "c", ["way"], registry=registry)
    tally = Tally()
    values = [0.0, 0.0005, 0.0007, 0.001, 0.003, 0.25, 9.9, 10.0, 10.5, 1e6, 0.01]
    for value in values:
        histogram.labels("direct").observe(value)
        counter.labels("direct").inc()
        tally.observe(histogram.labels("tally"), value)
        tally.inc(counter.labels("tally"))
    assert samples(registry, "tally")[("latency_seconds_count", "")] == 0  # nothing lands before a flush
    tally.flush()
    direct, deferred = samples(registry, "direct"), samples(registry, "tally")
    assert set(direct) == set(deferred) and all(math.isclose(direct[k], deferred[k]) for k in direct), (direct,
                                                                                                        deferred)
    assert direct[("latency_seconds_bucket", "0.001")] == 4 and direct[("answered_total", "")] == len(values)


def test_the_flush_thread_applies_sums_within_a_second_or_two() -> None:
    registry = CollectorRegistry()
    counter = Counter("flushed_total", "c", ["way"], registry=registry)
    tally = Tally()
    tally.inc(counter.labels("tally"), 3)
    for _ in range(40):
        if samples(registry, "tally").get(("flushed_total", "")) == 3:
            return
        time.sleep(0.1)
    raise AssertionError("the flush thread did not apply the pending sum within 4 s")
