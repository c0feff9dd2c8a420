"""Sliding windows of one version's requests (count, errors, latency), and the verdict on a
candidate.

# design: a ``Window`` is a ring of time slots (``SLOTS`` per window); a request adds to the slot of
# its second, under one lock held for a few integer additions (any request thread, the shadow
# threads). Latency goes into fixed logarithmic buckets (``BOUNDS``: 50 us to 60 s, 20% apart), so
# a p99 costs a walk over ~80 counters and is within one bucket (20%) of the exact value, and
# windows of several workers add up bucket by bucket (``Totals.merge``). ``judge`` compares a
# candidate's totals with the stable version's and says why it should be rolled back, or None.
"""

from __future__ import annotations

import math
import threading
import time
from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Any

SLOTS = 20
LOWEST_S, HIGHEST_S, RATIO = 50e-6, 60.0, 1.2
BOUNDS = tuple(LOWEST_S * RATIO**i for i in range(int(math.log(HIGHEST_S / LOWEST_S, RATIO)) + 2))


@dataclass
class Totals:
    """A window's sums: requests, errors, latency buckets of the answered ones, and (for a shadow)
    the samples compared with the stable version's answers and how many agreed."""

    requests: int = 0
    errors: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(BOUNDS) + 1))
    compared: int = 0
    agreed: int = 0

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def quantile(self, q: float) -> float | None:
        """The q-quantile of the answered requests' latency, in seconds (None: none answered);
        interpolated inside its bucket, as Prometheus' histogram_quantile does."""
        total = sum(self.buckets)
        if not total:
            return None
        rank, below = q * total, 0
        for index, count in enumerate(self.buckets):
            if count and below + count >= rank:
                low = BOUNDS[index - 1] if index else 0.0
                high = BOUNDS[index] if index < len(BOUNDS) else BOUNDS[-1]
                return low + (high - low) * (rank - below) / count
            below += count
        return BOUNDS[-1]

    def slower_than(self, seconds: float) -> float:
        """How many answered requests took longer than ``seconds`` (the bucket holding it counted in
        proportion, as ``quantile`` interpolates)."""
        count = 0.0
        for index, n in enumerate(self.buckets):
            if not n:
                continue
            low = BOUNDS[index - 1] if index else 0.0
            high = BOUNDS[index] if index < len(BOUNDS) else math.inf
            if low >= seconds:
                count += n
            elif high > seconds:
                count += n * (high - seconds) / (high - low) if high != math.inf else n
        return count

    def merge(self, other: Totals) -> Totals:
        return Totals(
            self.requests + other.requests,
            self.errors + other.errors,
            [a + b for a, b in zip(self.buckets, other.buckets, strict=True)],
            self.compared + other.compared,
            self.agreed + other.agreed,
        )

    def as_json(self) -> dict[str, Any]:
        """Compact, for a worker's acknowledgement file: only the buckets that hold requests."""
        return {
            "requests": self.requests,
            "errors": self.errors,
            "buckets": {str(i): n for i, n in enumerate(self.buckets) if n},
            "compared": self.compared,
            "agreed": self.agreed,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Totals:
        buckets = [0] * (len(BOUNDS) + 1)
        for index, count in data.get("buckets", {}).items():
            if 0 <= int(index) < len(buckets):
                buckets[int(index)] = int(count)
        return cls(
            int(data.get("requests", 0)),
            int(data.get("errors", 0)),
            buckets,
            int(data.get("compared", 0)),
            int(data.get("agreed", 0)),
        )

    def summary(self) -> dict[str, Any]:
        """What the traffic status shows for one version."""
        p50, p99 = self.quantile(0.5), self.quantile(0.99)
        summary: dict[str, Any] = {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": round(self.error_rate, 4),
            "p50_ms": None if p50 is None else round(p50 * 1000, 3),
            "p99_ms": None if p99 is None else round(p99 * 1000, 3),
        }
        if self.compared:
            summary["agreement"] = round(self.agreed / self.compared, 4)
            summary["compared"] = self.compared
        return summary


class Window:
    """One version's requests over the last ``seconds``: counts, errors and latency buckets."""

    def __init__(self, seconds: float, clock: Any = time.monotonic) -> None:
        self.seconds = seconds
        self.slot_s = seconds / SLOTS
        self._clock = clock
        self._lock = threading.Lock()
        self._ids = [-1] * SLOTS
        self._slots = [Totals() for _ in range(SLOTS)]

    def _slot(self, now: float) -> Totals:
        tick = int(now / self.slot_s)
        index = tick % SLOTS
        if self._ids[index] != tick:  # a slot from an earlier turn of the ring: start it afresh
            self._ids[index] = tick
            self._slots[index] = Totals()
        return self._slots[index]

    def add(self, seconds: float, failed: bool, compared: int = 0, agreed: int = 0) -> None:
        """One request: its latency (counted only when it was answered) and whether it failed."""
        bucket = bisect_left(BOUNDS, seconds)
        with self._lock:
            slot = self._slot(self._clock())
            slot.requests += 1
            if failed:
                slot.errors += 1
            else:
                slot.buckets[bucket] += 1
            slot.compared += compared
            slot.agreed += agreed

    def totals(self) -> Totals:
        """The sums over the window (the slots of the last ``seconds``)."""
        with self._lock:
            tick = int(self._clock() / self.slot_s)
            total = Totals()
            for ident, slot in zip(self._ids, self._slots, strict=True):
                if tick - SLOTS < ident <= tick:
                    total = total.merge(slot)
            return total


@dataclass(frozen=True)
class Margins:
    """When a candidate is rolled back: its error rate or p99 beyond the stable version's by these
    margins, once both have answered ``min_requests`` in the window."""

    error_rate: float
    p99_s: float
    min_requests: int
    window_s: float


def judge(stable: Totals, candidate: Totals, margins: Margins) -> tuple[str, str] | None:
    """Why ``candidate`` should be rolled back, as (``errors`` or ``latency``, the reason in words),
    or None while it does as well as the stable version, or either has answered too few requests in
    the window to say.

    Errors: the candidate's error rate exceeds the stable version's by more than the margin.
    Latency: its p99 exceeds the stable version's by more than the margin, which is to say more than
    1% of its answers took longer than the stable p99 plus the margin. Either must hold with
    confidence: the count beyond the line must exceed what that rate predicts by ``Z`` standard
    deviations (and by ``Z`` requests at least), so a few slow or failed requests in a small sample
    (a candidate's first calls, a stall of the machine) are not taken for a worse version.
    """
    if candidate.requests < margins.min_requests or stable.requests < margins.min_requests:
        return None
    window = f"over the last {margins.window_s:g}s"
    line = min(1.0, stable.error_rate + margins.error_rate)
    if _beyond(candidate.errors, candidate.requests, line):
        return "errors", (
            f"error rate {candidate.error_rate:.1%} ({candidate.errors} of {candidate.requests})"
            f" against the stable version's {stable.error_rate:.1%} {window}"
            f" (margin {margins.error_rate:.1%})"
        )
    ours, theirs = candidate.quantile(0.99), stable.quantile(0.99)
    answered = candidate.requests - candidate.errors
    if ours is not None and theirs is not None and ours - theirs > margins.p99_s:
        slower = candidate.slower_than(theirs + margins.p99_s)
        if _beyond(slower, answered, 0.01):
            return "latency", (
                f"p99 {ours * 1000:.1f} ms against the stable version's {theirs * 1000:.1f} ms"
                f" {window} (margin {margins.p99_s * 1000:g} ms; {slower:.0f} of {answered}"
                f" answers slower than {(theirs + margins.p99_s) * 1000:.1f} ms)"
            )
    return None


#: Standard deviations a count must exceed its expected value by before a candidate is condemned.
Z = 3.0


def _beyond(count: float, total: int, rate: float) -> bool:
    """Whether ``count`` of ``total`` is clearly more than ``rate`` predicts (a one-sided binomial
    test at about 3 sigma, with at least ``Z`` more than expected)."""
    expected = total * rate
    return count > expected + Z * math.sqrt(max(expected * (1.0 - rate), 1.0))
