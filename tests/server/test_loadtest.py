"""Smoke tests of the load-testing tools: locust headless against a real server, and the runner."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, clean_env

pytestmark = pytest.mark.slow
LOCUST = str(Path(sys.executable).with_name("locust"))


def locust(url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LOCUST, "-f", "locustfile.py", "--host", url, "--headless", "-u", "4", "-r", "4", "-t",
                           "4s", "--only-summary", *extra], cwd=ROOT, env=clean_env(), capture_output=True,
                          text=True, timeout=90, check=False)


def test_locust_headless_checks_answers_and_sets_the_exit_code(server_factory: Any, tmp_path: Path) -> None:
    server = server_factory(model="digits-torch", backend="onnx", mode="threaded").start()
    ok = locust(server.url, "--tags", "native", "--csv", str(tmp_path / "run"))
    assert ok.returncode == 0, ok.stderr[-3000:]
    with open(tmp_path / "run_stats.csv", newline="") as handle:
        rows = {row["Name"]: row for row in csv.DictReader(handle)}
    assert int(rows["Aggregated"]["Request Count"]) > 50 and rows["Aggregated"]["Failure Count"] == "0"
    assert {"/predict", "/predict/label", "/predict/label [png]"} <= set(rows)
    strict = locust(server.url, "--tags", "native", "--max-p95-ms", "0.001")
    assert strict.returncode == 1 and "p95" in strict.stderr


def test_loadtest_runner_produces_csv_and_summary(model_repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = subprocess.run(
        [sys.executable, "-m", "bench.loadtest", "--configs", "onnx-threaded", "--duration", "4", "--users", "4",
         "--workers", "1", "--repo", str(model_repo), "--out", str(out)],
        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=180, check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = (out / "summary.md").read_text()
    assert "| ONNX threaded | 1 x 4 |" in summary and "| 0 of " in summary
    assert (out / "onnx-threaded_stats.csv").exists() and (out / "throughput.png").exists()


def test_locust_sends_the_api_key_to_a_keyed_server(server_factory: Any, tmp_path: Path) -> None:
    key = "locust-" + "k" * 20
    server = server_factory(model="digits-torch", backend="onnx", mode="threaded", workers=1, api_keys=key).start()
    keyed = locust(server.url, "--api-key", key, "--csv", str(tmp_path / "keyed"))  # native and v2 users
    assert keyed.returncode == 0, keyed.stderr[-3000:]
    with open(tmp_path / "keyed_stats.csv", newline="") as handle:
        rows = {row["Name"]: row for row in csv.DictReader(handle)}
    assert int(rows["Aggregated"]["Request Count"]) > 50 and rows["Aggregated"]["Failure Count"] == "0"
    assert any(name.startswith("/v2/") for name in rows)
    assert locust(server.url, "--tags", "native").returncode == 1  # no key: the calibration fails, the run fails
