"""Drift statistics and the per-worker window: inputs, bins, PSI, merging workers, the gauges."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from serving.config import Settings
from serving.observability import drift_stats
from serving.observability.drift import DriftCollector, DriftMonitor, Reference
from serving.observability.drift_stats import input_names, psi, reduce, reference_statistics

RNG = np.random.default_rng(7)
LABELS = [str(i) for i in range(10)]


def images(count: int, shift: float = 0.0) -> np.ndarray:
    """Blob images whose brightness sits in the middle of the picture, like digits."""
    base = RNG.uniform(0.0, 0.3, (count, 28, 28)).astype(np.float32)
    base[:, 8:20, 8:20] += RNG.uniform(0.3, 0.7, (count, 1, 1)).astype(np.float32)
    return np.clip(base + shift, 0.0, 1.0)


def probabilities(count: int, favourite: int | None = None) -> np.ndarray:
    classes = RNG.integers(0, 10, count) if favourite is None else np.full(count, favourite)
    return np.eye(10, dtype=np.float32)[classes]


def test_an_image_is_reduced_to_its_mean_and_a_grid_of_bands() -> None:
    names = input_names((28, 28))
    assert names[0] == "mean_intensity" and names[1] == "band_0_0" and len(names) == 17
    batch = np.zeros((2, 28, 28), dtype=np.float32)
    batch[1, :7, :7] = 1.0  # the top-left band of the second image is bright
    reduced = reduce(batch)
    assert reduced.shape == (2, 17)
    assert reduced[1, 1] == pytest.approx(1.0) and reduced[1, 2] == 0.0
    assert reduced[1, 0] == pytest.approx(49 / 784)


def test_a_feature_vector_is_its_features() -> None:
    assert input_names((1, 4)) == ["feature_0", "feature_1", "feature_2", "feature_3"]
    assert input_names((1, 3), ["age", "height", "weight"]) == ["age", "height", "weight"]
    assert reduce(np.arange(8, dtype=np.float32).reshape(2, 1, 4)).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_psi_is_zero_for_the_same_distribution_and_large_for_a_moved_one() -> None:
    assert psi(np.array([1000, 2000, 3000]), np.array([100, 200, 300])) == pytest.approx(0.0, abs=1e-3)
    assert psi(np.array([100, 100, 100]), np.array([0, 0, 300])) > 2.0


def test_reference_statistics_hold_cut_points_counts_and_the_class_prior() -> None:
    reference = reference_statistics(images(2000), probabilities(500), LABELS)
    assert reference["format"] == drift_stats.FORMAT and reference["samples"] == 2000
    band = reference["inputs"]["band_1_1"]
    assert len(band["counts"]) == len(band["edges"]) + 1 and sum(band["counts"]) == 2000
    assert sum(reference["class_prior"]["counts"]) == 500 and reference["class_prior"]["labels"] == LABELS
    json.dumps(reference)  # it goes into metadata.json


def monitor(tmp_path: Path | None, **settings: object) -> DriftMonitor:
    return DriftMonitor(Settings(drift=True, drift_min_samples=200, **settings), str(tmp_path) if tmp_path else None)


def scores(found: DriftMonitor) -> dict[str, float]:
    registry = CollectorRegistry()
    registry.register(DriftCollector(found))
    text = generate_latest(registry).decode()
    result = {}
    for line in text.splitlines():
        if line.startswith("serving_drift_score{"):
            labels, value = line.rsplit(" ", 1)
            result[labels.split('input="')[1].split('"')[0]] = float(value)
    assert 'serving_drift_threshold{model="m",version="1"} 0.25' in text
    return result


def test_unshifted_traffic_scores_low_and_shifted_traffic_crosses_the_threshold() -> None:
    raw = reference_statistics(images(5000), probabilities(2000), LABELS)
    same = monitor(None)
    same.window_for("m:1", raw).observe(images(1000), probabilities(1000))
    low = scores(same)
    assert set(low) == {*raw["inputs"], "class_prior"}
    assert max(low.values()) < 0.1, low
    moved = monitor(None)
    moved.window_for("m:1", raw).observe(images(1000, shift=0.25), probabilities(1000, favourite=3))
    high = scores(moved)
    assert high["mean_intensity"] > 0.25 and high["class_prior"] > 0.25, high


def test_no_score_before_the_window_holds_enough_samples() -> None:
    raw = reference_statistics(images(1000), probabilities(100), LABELS)
    found = monitor(None)
    found.window_for("m:1", raw).observe(images(50), probabilities(50))
    assert scores(found) == {}


def test_workers_are_merged_through_their_files_and_a_dead_one_is_forgotten(tmp_path: Path) -> None:
    raw = reference_statistics(images(2000), probabilities(500), LABELS)
    first, second = monitor(tmp_path), monitor(tmp_path)
    first.window_for("m:1", raw).observe(images(150), probabilities(150))
    first.fold()
    second.window_for("m:1", raw).observe(images(150), probabilities(150))
    # the second's own fold writes drift_<pid>.json under the same pid: rename the first's file
    (tmp_path / next(p.name for p in tmp_path.glob("drift_*.json"))).rename(tmp_path / "drift_1.json")
    merged = second.merged()
    assert merged["m:1"]["samples"] == 300
    assert scores(second)  # 300 >= 200 samples: scored
    from serving.observability.drift import forget_worker

    forget_worker(str(tmp_path), 1)
    assert second.merged()["m:1"]["samples"] == 150


def test_the_window_forgets_traffic_older_than_its_span() -> None:
    raw = reference_statistics(images(1000), probabilities(100), LABELS)
    window = monitor(None, drift_window_s=10).window_for("m:1", raw)
    assert window is not None
    window.observe(images(100), probabilities(100))
    window.fold(now=1000.0)
    assert window.counts()["samples"] == 100
    window.fold(now=1009.5)
    assert window.counts()["samples"] == 100
    window.fold(now=1011.0)
    assert window.counts()["samples"] == 0


def test_a_model_without_reference_gets_no_window() -> None:
    assert monitor(None).window_for("m:1", None) is None
    with pytest.raises(ValueError):
        Reference("m:1", {"format": "something else"})
