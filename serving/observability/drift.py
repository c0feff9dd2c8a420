"""Drift: rolling-window statistics of what each model is served, scored against its reference.

# design: with ``SERVING_DRIFT`` on, every backend call of a model whose ``metadata.json`` carries
# reference statistics (``serving.observability.drift_stats``) hands its input batch and output to
# ``ModelWindow.observe``, which only appends the two references to a list (no copy, no numpy work
# on the request path; past ``MAX_PENDING`` samples a second, the rest are skipped). Once a second
# a daemon thread per worker (``DriftMonitor``) folds what was appended into bin counts, kept in
# ``SLOTS`` time slots that together span ``SERVING_DRIFT_WINDOW_S``, drops the slots that left the
# window, and publishes the window's counts. Workers are merged like the metrics: under gunicorn
# each writes ``drift_<pid>.json`` into the prometheus multiprocess directory (replaced atomically;
# wiped at start and removed when the worker dies, as its metric files are), and whichever worker
# answers ``/metrics`` sums every live worker's counts (``DriftCollector``) and exports, per model
# version, ``serving_drift_score{input}`` (the PSI of each input and of ``class_prior``) once the
# window holds ``SERVING_DRIFT_MIN_SAMPLES``, ``serving_drift_window_samples`` and
# ``serving_drift_threshold``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from prometheus_client.core import GaugeMetricFamily

from serving.config import Settings
from serving.observability import metrics, observed
from serving.observability.drift_stats import (
    CLASS_PRIOR,
    FORMAT,
    bin_counts,
    class_counts,
    psi,
    reduce,
)

log = logging.getLogger("serving")
SLOTS = 10
FOLD_SECONDS = 1.0
#: Samples a model's window takes per fold; beyond, a busy worker skips the rest of that second.
MAX_PENDING = 8192
FILE_PREFIX = "drift_"


class Reference:
    """A model version's reference statistics, as ``metadata.json`` records them."""

    def __init__(self, label: str, raw: dict[str, Any]) -> None:
        if raw.get("format") != FORMAT:
            raise ValueError(f"reference statistics of {label} are not {FORMAT}")
        self.label = label
        self.names = list(raw["inputs"])
        self.edges = [np.asarray(raw["inputs"][name]["edges"]) for name in self.names]
        self.counts = [np.asarray(raw["inputs"][name]["counts"]) for name in self.names]
        self.classes = np.asarray(raw[CLASS_PRIOR]["counts"])

    def scores(self, window: dict[str, Any]) -> dict[str, float]:
        """PSI of each input and of the class prior, for a window's merged counts."""
        result = {
            name: psi(reference, np.asarray(counts))
            for name, reference, counts in zip(
                self.names, self.counts, window["inputs"], strict=True
            )
        }
        result[CLASS_PRIOR] = psi(self.classes, np.asarray(window["classes"]))
        return result


class ModelWindow:
    """One model version's traffic over the window, in this worker."""

    def __init__(self, reference: Reference, window_s: float) -> None:
        self.reference = reference
        self.slot_s = window_s / SLOTS
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_samples = 0
        self._lock = threading.Lock()
        self._slots: dict[int, tuple[list[np.ndarray], np.ndarray, int]] = {}

    def observe(self, batch: np.ndarray, output: np.ndarray) -> None:
        """Note one model call (the request path: an append)."""
        if self._pending_samples < MAX_PENDING:
            with self._lock:
                self._pending.append((batch, output))
                self._pending_samples += len(batch)

    def fold(self, now: float) -> bool:
        """Bin what was observed into the current slot and drop expired slots; True if the window
        changed."""
        with self._lock:
            pending, self._pending, self._pending_samples = self._pending, [], 0
        slot = int(now // self.slot_s)
        changed = False
        for old in [key for key in self._slots if key <= slot - SLOTS]:
            del self._slots[old]
            changed = True
        if not pending:
            return changed
        batch = np.concatenate([np.asarray(b, dtype=np.float32) for b, _ in pending])
        output = np.concatenate([np.asarray(o) for _, o in pending])
        inputs = bin_counts(reduce(batch), self.reference.edges)
        classes = class_counts(output, len(self.reference.classes))
        current = self._slots.get(slot)
        if current is not None:
            inputs = [a + b for a, b in zip(current[0], inputs, strict=True)]
            classes = current[1] + classes
        self._slots[slot] = (inputs, classes, (current[2] if current else 0) + len(batch))
        return True

    def counts(self) -> dict[str, Any]:
        """The window's counts: per input, the class counts, and how many samples."""
        reference = self.reference
        inputs = [np.zeros(len(edges) + 1, dtype=np.int64) for edges in reference.edges]
        classes = np.zeros(len(reference.classes), dtype=np.int64)
        samples = 0
        for slot_inputs, slot_classes, slot_samples in list(self._slots.values()):
            inputs = [a + b for a, b in zip(inputs, slot_inputs, strict=True)]
            classes = classes + slot_classes
            samples += slot_samples
        return {
            "inputs": [x.tolist() for x in inputs],
            "classes": classes.tolist(),
            "samples": samples,
        }


class DriftMonitor:
    """This worker's windows, their fold thread and what it publishes for ``/metrics``."""

    def __init__(self, settings: Settings, directory: str | None) -> None:
        self.settings = settings
        self.directory = Path(directory) if directory else None
        self.windows: dict[str, ModelWindow] = {}
        self._started_in = 0
        observed.at_exit(self.publish)

    def window_for(self, label: str, raw: dict[str, Any] | None) -> ModelWindow | None:
        """The window of model ``label`` (None, with a log line, when it has no reference)."""
        if label in self.windows:
            return self.windows[label]
        if not raw:
            log.info("drift: %s has no reference statistics (retrain or re-import it)", label)
            return None
        window = ModelWindow(Reference(label, raw), self.settings.drift_window_s)
        self.windows[label] = window
        if self._started_in != os.getpid():
            self._started_in = os.getpid()
            threading.Thread(target=self._fold_forever, name="drift-fold", daemon=True).start()
        return window

    def _fold_forever(self) -> None:
        while True:
            time.sleep(FOLD_SECONDS)
            try:
                self.fold()
            except Exception:  # the next second tries again
                log.exception("drift: folding the window failed")

    def fold(self) -> None:
        now = time.time()
        changed = [window.fold(now) for window in list(self.windows.values())]
        if any(changed):
            self.publish()

    def publish(self) -> None:
        """Write this worker's window counts where ``/metrics`` merges them (multiprocess)."""
        if self.directory is None:
            return
        data = {label: window.counts() for label, window in list(self.windows.items())}
        target = self.directory / f"{FILE_PREFIX}{os.getpid()}.json"
        temporary = target.with_suffix(".tmp")
        temporary.write_bytes(orjson.dumps(data))
        os.replace(temporary, target)

    def merged(self) -> dict[str, dict[str, Any]]:
        """Every live worker's window counts, summed per model version."""
        if self.directory is None:
            self.fold()
            return {label: window.counts() for label, window in self.windows.items()}
        self.fold()
        total: dict[str, dict[str, Any]] = {}
        for path in self.directory.glob(f"{FILE_PREFIX}*.json"):
            try:
                data = orjson.loads(path.read_bytes())
            except (OSError, orjson.JSONDecodeError):
                continue  # removed, or replaced as it was read
            for label, counts in data.items():
                _add(total, label, counts)
        return total


def _add(total: dict[str, dict[str, Any]], label: str, counts: dict[str, Any]) -> None:
    found = total.get(label)
    if found is None:
        total[label] = counts
        return
    found["inputs"] = [
        (np.asarray(a) + np.asarray(b)).tolist()
        for a, b in zip(found["inputs"], counts["inputs"], strict=True)
    ]
    found["classes"] = (np.asarray(found["classes"]) + np.asarray(counts["classes"])).tolist()
    found["samples"] += counts["samples"]


class DriftCollector:
    """``serving_drift_score``, ``serving_drift_threshold`` and ``serving_drift_window_samples``,
    computed at scrape time from every worker's window."""

    def __init__(self, monitor: DriftMonitor) -> None:
        self.monitor = monitor

    def collect(self) -> Iterator[GaugeMetricFamily]:
        settings = self.monitor.settings
        scores = GaugeMetricFamily(
            "serving_drift_score",
            "Population stability index of each input (a pixel band, a feature, or class_prior:"
            " the predicted classes) over the drift window against the reference statistics",
            labels=["model", "version", "input"],
        )
        threshold = GaugeMetricFamily(
            "serving_drift_threshold",
            "The drift score above which the alert fires (SERVING_DRIFT_THRESHOLD)",
            labels=["model", "version"],
        )
        samples = GaugeMetricFamily(
            "serving_drift_window_samples",
            "Samples in the drift window, every worker together",
            labels=["model", "version"],
        )
        for label, counts in sorted(self.monitor.merged().items()):
            window = self.monitor.windows.get(label)
            name, _, version = label.rpartition(":")
            threshold.add_metric([name, version], settings.drift_threshold)
            samples.add_metric([name, version], counts["samples"])
            if window is None or counts["samples"] < settings.drift_min_samples:
                continue
            for input_name, score in window.reference.scores(counts).items():
                scores.add_metric([name, version, input_name], score)
        yield scores
        yield threshold
        yield samples


_lock = threading.Lock()
_monitor: DriftMonitor | None = None


def for_settings(settings: Settings, directory: str | None = None) -> DriftMonitor | None:
    """This process's ``DriftMonitor`` (None with ``SERVING_DRIFT`` off), its collector registered
    for ``/metrics`` on first use."""
    global _monitor
    if not settings.drift:
        return None
    with _lock:
        if _monitor is None:
            _monitor = DriftMonitor(settings, directory or metrics.multiprocess_directory())
            metrics.register_collector(DriftCollector(_monitor))
        return _monitor


def forget_worker(directory: str | None, pid: int) -> None:
    """Master: a worker died; its window no longer counts."""
    if directory:
        Path(directory, f"{FILE_PREFIX}{pid}.json").unlink(missing_ok=True)
