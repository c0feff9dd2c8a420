"""A short replica rehearsal: two servers in their own network namespaces behind nginx, under Locust.

The same code as bench/replicas.py (whose full run is in reports/), on a shorter plan: SIGTERM one replica
(a rolling update's graceful stop) and restore it, then SIGKILL the other. A graceful stop must cost no
request; a kill may cost at most the requests that replica held, and nginx retries even those.
Needs root (ip netns) and Debian's nginx.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from bench.replicas import rehearse

pytestmark = pytest.mark.slow


def test_a_graceful_stop_behind_nginx_fails_no_request_and_a_kill_at_most_its_in_flight(
        model_repo: Path, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (CI runs as root)")
    result = rehearse(model_repo, tmp_path / "rehearsal", "digits-torch", replicas=2, users=8, seconds=16,
                      plan=((4, "sigterm", 0), (7, "restore", 0), (11, "sigkill", 1)), subnet=214, window=3.0,
                      backend="onnx")
    rows = {name: (replica, note, stats) for name, replica, note, stats in result["rows"]}  # type: ignore[attr-defined]
    _, note, sigterm = rows["SIGTERM"]
    assert sigterm["requests"] > 20 and sigterm["failures"] == 0, rows
    assert "exited with status 0" in note, note
    _, _, sigkill = rows["SIGKILL"]
    assert sigkill["requests"] > 20 and sigkill["failures"] <= sigkill["reset"], rows
    _, ready, restore = rows["restore"]
    assert restore["failures"] == 0 and "ready again" in ready, rows
    total = result["total"]
    assert total["failures"] <= sigkill["reset"], total  # type: ignore[index]
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert f"serving-r{os.getpid()}-" not in left  # every namespace removed
