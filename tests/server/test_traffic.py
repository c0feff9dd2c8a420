"""Canary and shadow traffic under load through real gunicorn: bench/traffic.py's phases, sized for the suite.

One server (two workers, batched mode) serves digits-torch 1 and three faulty copies of it (tests/fakes.py,
``FaultyVersion``). Client threads send unversioned v2 requests over keep-alive connections; every answer must
be a 200 in every phase:

- the observed split over 20,000 requests is within 2 points of the weights;
- every sticky key sees exactly one version;
- a candidate that starts failing is rolled back within one window (5 s here), the stable version answering
  what it fails meanwhile; a worker killed after that comes back with the rolled-back rule;
- a slow candidate put in force through the admin API under load is rolled back within one window;
- a shadow gets copies, never answers, and its agreement and latency difference are reported.

The ASGI front routes the same way (a shorter run). ``python -m bench.traffic`` runs the long version.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.traffic import (
    Load,
    build_repository,
    canary_server,
    failures,
    rollback_on_errors,
    rollback_on_latency,
    set_rule,
    shadow_phase,
    shares,
    split_phase,
    status,
    sticky_phase,
)
from serving.tools.testing import GunicornServer

pytestmark = pytest.mark.slow
WINDOW_S = 5.0


@pytest.fixture(scope="module")
def canary(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GunicornServer, Path]]:
    work = tmp_path_factory.mktemp("traffic")
    fault_file = work / "fail"
    repo = build_repository(model_repo, work / "models", fault_file)
    with canary_server("wsgi", repo, work, WINDOW_S) as server:
        yield server, fault_file


def test_the_split_over_20000_requests_is_within_2_points_of_the_weights(canary: tuple[GunicornServer, Path]) -> None:
    server, _ = canary
    answers, _ = split_phase(server.url, 20_000)
    assert len(answers) == 20_000 and failures(answers) == []
    observed = shares(answers)
    assert set(observed) == {"1", "2"}
    assert abs(observed["1"] - 0.90) <= 0.02 and abs(observed["2"] - 0.10) <= 0.02, observed
    metrics = server.metrics(lambda text: 'serving_traffic_weight{model="digits-torch",role="candidate"' in text)
    assert 'serving_traffic_weight{model="digits-torch",role="candidate",version="2"} 10.0' in metrics
    assert 'serving_model_requests_total{model="digits-torch:2",outcome="ok"}' in metrics


def test_a_sticky_key_always_gets_the_same_version(canary: tuple[GunicornServer, Path]) -> None:
    server, _ = canary
    answers, versions = sticky_phase(server.url, 3000, keys=300)
    assert failures(answers) == [] and len(versions) == 300
    assert all(len(seen) == 1 for seen in versions.values()), {k: v for k, v in versions.items() if len(v) > 1}
    on_two = sum(seen == {"2"} for seen in versions.values()) / len(versions)
    assert 0.03 < on_two < 0.20, on_two  # 10% of the keys, give or take the draw of 300 keys


def test_a_failing_candidate_is_rolled_back_within_one_window_and_no_request_fails(
        canary: tuple[GunicornServer, Path]) -> None:
    server, fault_file = canary
    try:
        answers, delay, event = rollback_on_errors(server.url, fault_file, WINDOW_S)
    finally:
        fault_file.unlink(missing_ok=True)
    assert failures(answers) == [] and len(answers) > 500
    assert delay <= WINDOW_S, f"rolled back {delay:.2f}s after the first failure"
    assert event["kind"] == "errors" and event["rule"] == "v1 100%, v2 0%", event
    last_two = max(answer.at for answer in answers if answer.version == "2")
    assert all(answer.version == "1" for answer in answers if answer.at > last_two)
    state = status(server.url)
    assert state["rule"] == "v1 100%, v2 0%" and state["versions"][1]["percent"] == 0.0
    metrics = server.metrics(lambda text: "serving_traffic_rollbacks_total{" in text)
    assert 'serving_traffic_rollbacks_total{model="digits-torch",reason="errors",version="2"} 1.0' in metrics
    assert 'serving_traffic_weight{model="digits-torch",role="candidate",version="2"} 0.0' in metrics
    assert "rolled back digits-torch:2 (weight 0, the stable version answers): error rate" in server.log()
    fallbacks = [line for line in metrics.splitlines() if line.startswith("serving_traffic_fallbacks_total")
                 and 'version="2"' in line]
    assert fallbacks and float(fallbacks[0].split()[-1]) > 0

    # a worker that starts after the rollback serves the rolled-back rule, not the settings' one
    children = Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()
    os.kill(int(children[0]), signal.SIGKILL)
    time.sleep(0.5)
    server.wait_ready(60)
    answers = Load(server.url, 4, 2000).start().join()
    assert failures(answers) == [] and shares(answers) == {"1": 1.0}


def test_a_slow_candidate_put_in_force_under_load_is_rolled_back_within_one_window(
        canary: tuple[GunicornServer, Path]) -> None:
    server, _ = canary
    answers, delay, event = rollback_on_latency(server.url, WINDOW_S)
    assert failures(answers) == [] and {"1", "3"} <= set(shares(answers))
    assert delay <= WINDOW_S and event["kind"] == "latency", (delay, event)
    assert event["reason"].startswith("p99 ") and "(margin 50 ms; " in event["reason"]


def test_a_shadow_is_compared_and_never_answers(canary: tuple[GunicornServer, Path]) -> None:
    server, _ = canary
    answers, state = shadow_phase(server.url, 3.0)
    assert failures(answers) == [] and shares(answers) == {"1": 1.0}
    shadow = state["shadow"]
    assert shadow["version"] == "4" and shadow["compared"] > 100 and shadow["agreement"] == 0.0, shadow
    assert set(shadow["latency_difference_ms"]) == {"p50", "p99"}
    assert all(value is not None for value in shadow["latency_difference_ms"].values())
    metrics = server.metrics(lambda text: 'serving_shadow_samples_total{model="digits-torch",result="disagree"' in text)
    assert 'serving_shadow_samples_total{model="digits-torch",result="agree",version="4"} 0.0' in metrics
    cleared = set_rule(server.url, None)  # DELETE: the latest served version answers again
    assert cleared["rule"] is None and cleared["workers"] == 2
    assert shares(Load(server.url, 2, 200).start().join()) == {"4": 1.0}


def test_the_asgi_front_routes_the_same_way(model_repo: Path, tmp_path: Path) -> None:
    repo = build_repository(model_repo, tmp_path / "models", tmp_path / "fail")
    with canary_server("asgi", repo, tmp_path, WINDOW_S) as server:
        answers, _ = split_phase(server.url, 5000)
        observed = shares(answers)
        assert failures(answers) == [] and abs(observed["2"] - 0.10) <= 0.02, observed
        answers, versions = sticky_phase(server.url, 1000, keys=100)
        assert failures(answers) == [] and all(len(seen) == 1 for seen in versions.values())
