"""Canary and shadow traffic in process: the rule grammar, the draw, the windows and their verdict, and the
data plane routing real ONNX models (a candidate that fails falls back to the stable version, a shadow is
compared, a failing candidate is judged), with the shared state changed and acknowledged by a real watcher.

Under load through real gunicorn: tests/server/test_traffic.py.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from serving.config import Settings
from serving.errors import ConfigError, InvalidRequest, ModelLoadError, ModelNotFound
from serving.fronts.parts import parts_of
from serving.fronts.wsgi import create_app
from serving.runtime.model_control import ControlError
from serving.runtime.release import Routed
from serving.runtime.service import InferenceService
from serving.runtime.shadow import ShadowCopy, ShadowRunner
from serving.runtime.traffic import check_rule
from serving.runtime.traffic_control import TrafficControl
from serving.runtime.traffic_rules import TrafficRule, parse_rule, parse_rules, pick, sticky_draw
from serving.runtime.traffic_window import BOUNDS, Margins, Totals, Window, judge
from serving.runtime.watcher import ModelWatcher
from serving.store.repository import ModelRepository
from serving.toolchain.data import load_digits_dataset
from tests.runtime.test_model_control import publish

X = load_digits_dataset(seed=0).x_test[:8].astype(np.float32)


# -- the grammar -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "split", "shadow", "sticky"), [
    ("v1", ((1, 100.0),), None, ""),
    ("1 90%, 2 10%", ((1, 90.0), (2, 10.0)), None, ""),
    ("v2 90%, v3 10%", ((2, 90.0), (3, 10.0)), None, ""),
    ("v1, v2 10%", ((1, 90.0), (2, 10.0)), None, ""),  # the one without a share takes the rest
    ("v1 99.5%, v2 0.5%", ((1, 99.5), (2, 0.5)), None, ""),
    ("v1, v2 shadow", ((1, 100.0),), (2, 100.0), ""),
    ("V1 80%, v2 20%, v3 SHADOW 25%, sticky X-User-Id", ((1, 80.0), (2, 20.0)), (3, 25.0), "X-User-Id"),
    ("v1 100%, v2 0%", ((1, 100.0), (2, 0.0)), None, ""),
])
def test_a_rule_is_parsed_and_written_back_the_same(text: str, split: Any, shadow: Any, sticky: str) -> None:
    rule = parse_rule("digits", text)
    assert (rule.split, (rule.shadow, rule.shadow_percent) if shadow else None, rule.sticky) == (split, shadow, sticky)
    assert rule.stable == split[0][0]
    assert parse_rule("digits", rule.text()) == rule


@pytest.mark.parametrize(("text", "message"), [
    ("v1 90%, v2 20%", "add up to 110%, not 100%"),
    ("v1 90%, v2 5%", "add up to 95%, not 100%"),
    ("v1, v2", "give every version but one its percentage (v2 has none)"),
    ("v1, v1 10%", "version 1 is listed twice"),
    ("v1, v2 shadow, v3 shadow", "one shadow version per model"),
    ("v1, v1 shadow", "version 1 is listed twice"),
    ("v1 150%", "150% is over 100%"),
    ("v2 shadow", "name the version that answers"),
    ("v1, latest 10%", "'latest 10%' is not 'vN P%'"),
    ("v1, sticky X User", "is not 'vN P%'"),
    ("v1, sticky A, sticky B", "one sticky header"),
    ("v1, sticky X_User", "one sticky header, letters, digits and '-' only"),
])
def test_a_wrong_rule_is_refused_with_what_to_write(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match="traffic rule for digits: .*" + re.escape(message)):
        parse_rule("digits", text)


def test_the_setting_holds_a_rule_per_model() -> None:
    rules = parse_rules("digits-torch: v1 90%, v2 10%; digits-tf: v1, v2 shadow;")
    assert list(rules) == ["digits-torch", "digits-tf"] and rules["digits-tf"].shadow == 2
    for spec, message in [("v1 90%, v2 10%", "needs the model's name first"), ("a: v1; a: v2", "'a' has two rules"),
                          ("a: v1, v2", "SERVING_TRAFFIC: traffic rule for a: give every version")]:
        with pytest.raises(ConfigError, match=message):
            parse_rules(spec)
    with pytest.raises(ConfigError, match="SERVING_TRAFFIC: traffic rule for a: the shares add up to 50%"):
        InferenceService(Settings.from_env({"SERVING_TRAFFIC": "a: v1 50%"}))


def test_a_rollback_gives_the_share_to_the_stable_version_and_stops_a_shadow() -> None:
    rule = parse_rule("m", "v1 70%, v2 20%, v3 10%, v4 shadow 50%")
    assert rule.candidates() == [2, 3, 4]
    back = rule.rolled_back(2)
    assert back.text() == "v1 90%, v2 0%, v3 10%, v4 shadow 50%" and back.candidates() == [3, 4]
    assert back.rolled_back(4).text() == "v1 90%, v2 0%, v3 10%, v4 shadow 0%"
    assert back.rolled_back(4).rolled_back(3).candidates() == []


# -- the draw --------------------------------------------------------------------------------------------------
def test_uniform_draws_land_on_each_version_by_its_weight() -> None:
    rule = parse_rule("m", "v1 70%, v2 0%, v3 20%, v4 10%")
    bounds = rule.bounds()
    draws = np.linspace(0, 1, 10_000, endpoint=False)
    counts = collections.Counter(pick(bounds, float(d)) for d in draws)
    assert counts == {1: 7000, 3: 2000, 4: 1000}  # a 0% version gets nothing
    assert pick(TrafficRule("m", ((1, 0.0), (2, 0.0))).bounds(), 0.5) == 1  # no share left: the stable one


def test_sticky_values_keep_their_version_and_a_growing_candidate_keeps_its_values() -> None:
    keys = [f"user-{i}" for i in range(5000)]
    at10, at20 = parse_rule("m", "v1 90%, v2 10%").bounds(), parse_rule("m", "v1 80%, v2 20%").bounds()
    first = {key: pick(at10, sticky_draw("m", key)) for key in keys}
    assert first == {key: pick(at10, sticky_draw("m", key)) for key in keys}  # the same value, the same version
    share = sum(v == 2 for v in first.values()) / len(keys)
    assert 0.08 < share < 0.12, share
    later = {key: pick(at20, sticky_draw("m", key)) for key in keys}
    assert all(later[key] == 2 for key in keys if first[key] == 2)  # ramping up moves nobody back
    assert sticky_draw("m", "user-1") != sticky_draw("other", "user-1")  # models draw independently


# -- windows and the verdict -----------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_window_forgets_what_is_older_than_its_span() -> None:
    clock = Clock()
    window = Window(10.0, clock)
    for _ in range(100):
        window.add(0.001, False)
    window.add(0.5, True)
    clock.now += 6
    for _ in range(50):
        window.add(0.010, False)
    totals = window.totals()
    assert (totals.requests, totals.errors) == (151, 1)
    clock.now += 5  # the first 101 are now older than 10 s
    totals = window.totals()
    assert (totals.requests, totals.errors) == (50, 0)
    clock.now += 30
    assert window.totals().requests == 0


def test_window_quantiles_are_within_a_bucket_and_add_up_across_workers() -> None:
    rng = np.random.default_rng(0)
    latencies = rng.lognormal(np.log(0.004), 0.6, 5000)
    workers = [Window(30.0), Window(30.0)]
    for i, seconds in enumerate(latencies):
        workers[i % 2].add(float(seconds), False)
    merged = Totals.from_json(orjson.loads(orjson.dumps(workers[0].totals().as_json()))).merge(workers[1].totals())
    assert merged.requests == 5000
    for q in (0.5, 0.99):
        exact = float(np.quantile(latencies, q))
        assert abs(merged.quantile(q) - exact) / exact < 0.2, (q, merged.quantile(q), exact)  # type: ignore[operator]
    assert len(BOUNDS) < 100


def totals(requests: int, errors: int = 0, latency_s: float = 0.001, slow: int = 0) -> Totals:
    """A window of ``requests``: the first ``errors`` failed, the next ``slow`` took 200 ms, the rest ``latency_s``."""
    window = Window(30.0)
    for i in range(requests):
        window.add(0.2 if errors <= i < errors + slow else latency_s, i < errors)
    return window.totals()


def test_a_candidate_is_judged_on_errors_and_p99_once_both_have_enough_requests() -> None:
    margins = Margins(error_rate=0.05, p99_s=0.050, min_requests=50, window_s=30.0)
    stable = totals(500, errors=5)
    assert judge(stable, totals(49, errors=49), margins) is None  # too few to say
    assert judge(totals(49), totals(100, errors=100), margins) is None
    assert judge(stable, totals(100, errors=5), margins) is None  # 5% against 1%: within the 5 points
    assert judge(stable, totals(100, errors=9), margins) is None  # beyond them, but within the noise of 100
    kind, reason = judge(stable, totals(100, errors=20), margins)  # type: ignore[misc]
    assert kind == "errors" and reason.startswith("error rate 20.0% (20 of 100) against the stable version's 1.0%")
    assert judge(stable, totals(100, latency_s=0.045), margins) is None
    assert judge(stable, totals(100, slow=3), margins) is None  # a p99 of 200 ms made of 3 stalls: noise
    kind, reason = judge(stable, totals(100, slow=10), margins)  # type: ignore[misc]
    assert kind == "latency" and "(margin 50 ms; 10 of 100 answers slower than" in reason
    kind, reason = judge(stable, totals(100, latency_s=0.2), margins)  # type: ignore[misc]
    assert kind == "latency" and reason.startswith("p99 2") and "against the stable version's 1." in reason


# -- the data plane, real models ------------------------------------------------------------------------------
@pytest.fixture
def canary_repo(repo_copy: Path, tmp_path: Path) -> Path:
    """digits-torch 1 (stable), 2 (a copy that fails while tmp/fail exists), 3 (a copy that disagrees)."""
    publish(repo_copy, "digits-torch", 2)
    publish(repo_copy, "digits-torch", 3)
    for version, kind in ((2, "raise"), (3, "wrong")):
        path = repo_copy / "digits-torch" / str(version) / "metadata.json"
        meta = orjson.loads(path.read_bytes())
        meta["test_fault"] = {"kind": kind, **({"when": str(tmp_path / "fail")} if kind == "raise" else {})}
        path.write_bytes(orjson.dumps(meta))
    return repo_copy


def settings_for(repo: Path, traffic: str, **overrides: Any) -> Settings:
    return Settings.from_env({}, model_repository=repo, model="digits-torch", backend="tests.fakes:FaultyVersion",
                             workers=1, traffic=traffic, **overrides)


def served(repo: Path, traffic: str, **overrides: Any) -> InferenceService:
    service = InferenceService(settings_for(repo, traffic, **overrides))
    service.load(workers=1)
    return service


def answer(service: InferenceService, header: dict[str, str] | None = None) -> tuple[np.ndarray, int]:
    route = service.route("digits-torch", None, (header or {}).get)
    output, model = service.answer(route, X)
    return output, model.meta.version


def test_the_rule_names_the_versions_served_and_routes_unversioned_requests(canary_repo: Path) -> None:
    service = served(canary_repo, "digits-torch: v1 75%, v2 25%", models="digits-tf")
    try:  # the latest version by the policy, and those the rule names
        assert list(service.served) == [("digits-tf", 1), ("digits-torch", 1), ("digits-torch", 2),
                                        ("digits-torch", 3)]
        counts = collections.Counter(answer(service)[1] for _ in range(2000))
        assert set(counts) == {1, 2} and 0.20 < counts[2] / 2000 < 0.30, counts
        assert service.route("digits-torch", 3).meta.version == 3  # a version asked for is never routed
        assert service.route("digits-tf") is service.model("digits-tf")  # a model without a rule
        assert isinstance(service.route(), Routed)  # the native API's model has the rule
    finally:
        service.close()


def test_a_failing_candidate_is_answered_by_the_stable_version_and_judged(canary_repo: Path, tmp_path: Path) -> None:
    service = served(canary_repo, "digits-torch: v1 50%, v2 50%", traffic_min_requests=20)
    try:
        for _ in range(40):
            answer(service)
        assert service.traffic.verdicts() == []
        (tmp_path / "fail").touch()
        versions = collections.Counter(answer(service)[1] for _ in range(200))
        assert versions == {1: 200}  # every request answered, by the stable version
        stats = service.traffic.releases["digits-torch"].windows[2].totals()
        assert stats.errors > 50 and stats.requests - stats.errors < 40  # ~20 answered before the fault
        [(name, version, kind, reason)] = service.traffic.verdicts()
        assert (name, version, kind) == ("digits-torch", 2, "errors") and "against the stable version's 0.0%" in reason
        assert service.settings.traffic_rollback
    finally:
        service.close()
    (tmp_path / "fail").unlink()  # the load's sample check must pass
    quiet = served(canary_repo, "digits-torch: v1 50%, v2 50%", traffic_min_requests=20, traffic_rollback=False)
    (tmp_path / "fail").touch()
    try:
        for _ in range(100):
            answer(quiet)
        assert quiet.traffic.verdicts() == []  # automatic rollback off: judged by nobody
    finally:
        quiet.close()


def test_a_shadow_gets_copies_whose_answers_are_compared_not_returned(canary_repo: Path) -> None:
    service = served(canary_repo, "digits-torch: v1, v3 shadow")
    try:
        outputs = [answer(service) for _ in range(100)]
        assert {version for _, version in outputs} == {1}
        expected = service.model("digits-torch", 1).infer(X, 5.0)
        assert all(np.array_equal(output, expected) for output, _ in outputs)
        release = service.traffic.releases["digits-torch"]
        deadline = time.monotonic() + 10
        while release.windows[3].totals().requests < 100 and time.monotonic() < deadline:
            time.sleep(0.05)
        shadow = release.windows[3].totals()
        assert shadow.requests == 100 and shadow.compared == 800 and shadow.agreed == 0  # v3 always disagrees
        assert release.paired.totals().requests == 100
    finally:
        service.close()


def test_a_shadow_beside_a_canary_gets_copies_of_the_stable_answers_only(canary_repo: Path) -> None:
    service = served(canary_repo, "digits-torch: v1 50%, v2 50%, v3 shadow")
    try:
        stable = sum(answer(service)[1] == 1 for _ in range(200))
        assert 60 < stable < 140
        window = service.traffic.releases["digits-torch"].windows[3]
        deadline = time.monotonic() + 10
        while window.totals().requests < stable and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        assert window.totals().requests == stable
    finally:
        service.close()


def test_a_rule_must_name_served_versions_with_the_same_input(canary_repo: Path) -> None:
    path = canary_repo / "digits-torch" / "3" / "metadata.json"
    meta = orjson.loads(path.read_bytes())
    meta["input"]["range"] = [0.0, 16.0]
    path.write_bytes(orjson.dumps(meta))
    expected = r"version 3 takes 8x8 pixels, float32 in \[0.0, 16.0\] with 10 labels but version 1"
    with pytest.raises(ConfigError, match=expected):
        served(canary_repo, "digits-torch: v1 90%, v3 10%")
    with pytest.raises(ModelLoadError, match="SERVING_TRAFFIC names digits-torch:9, which is not in the repository"):
        served(canary_repo, "digits-torch: v1 90%, v9 10%")
    service = served(canary_repo, "")
    try:
        with pytest.raises(ConfigError, match=r"version 2 is not served \(served: 3\)"):
            check_rule(parse_rule("digits-torch", "v3, v2 shadow"), service.served)
    finally:
        service.close()


def test_a_rule_between_feature_models_names_their_features(iris_repo: Path) -> None:
    stable = ModelRepository.load_metadata(iris_repo / "iris-svc" / "1")
    other = dataclasses.replace(stable, labels=[*stable.labels, "extra"])
    served = {("iris-svc", 1): (stable,), ("iris-svc", 2): (other,)}
    with pytest.raises(ConfigError, match=r"version 2 takes 4 features \(.*\), float32 in .* with 4 labels but"
                                          r" version 1 takes 4 features \(.*\), float32 in .* with 3 labels"):
        check_rule(parse_rule("iris-svc", "v1 90%, v2 10%"), served)


# -- the shared state, acknowledged by a real watcher ---------------------------------------------------------
@pytest.fixture
def watched(canary_repo: Path, tmp_path: Path) -> Iterator[tuple[InferenceService, Any]]:
    """A service with a real watcher thread acknowledging changes in a private control directory."""
    app = create_app(settings_for(canary_repo, "digits-torch: v1 90%, v2 10%", traffic_min_requests=20))
    service = parts_of(app).service  # type: ignore[union-attr]
    service.load(workers=1)
    watcher = ModelWatcher(service, workers=1)
    watcher.prime()
    watcher.start()
    try:
        yield service, app.test_client()
    finally:
        watcher.stopping.set()
        watcher.join(5)
        service.close()


def test_rules_change_on_every_worker_and_a_failing_candidate_is_rolled_back(
        watched: tuple[InferenceService, Any], tmp_path: Path) -> None:
    service, _ = watched
    control = TrafficControl.of(service)
    changed = control.set("digits-torch", "v1 50%, v2 50%", timeout_s=10)
    assert changed == {"name": "digits-torch", "rule": "v1 50%, v2 50%", "workers": 1, "generation": 1}
    assert service.traffic.releases["digits-torch"].rule.text() == "v1 50%, v2 50%"
    with pytest.raises(InvalidRequest, match="is not 'vN P%'"):
        control.set("digits-torch", "v1 50%, half", 10)
    with pytest.raises(ControlError, match="version 7 is not served") as conflict:
        control.set("digits-torch", "v1, v7 10%", 10)
    assert conflict.value.status_code == 409
    with pytest.raises(ModelNotFound):
        control.set("nope", "v1", 10)
    (tmp_path / "fail").touch()
    started = time.monotonic()
    while control.rules(control.files.read())["digits-torch"].weight(2) and time.monotonic() - started < 10:
        assert answer(service)[1] == 1  # the stable version answers what the candidate fails
    rolled = control.rules(control.files.read())["digits-torch"]
    assert rolled.text() == "v1 100%, v2 0%" and time.monotonic() - started < 5
    deadline = time.monotonic() + 2
    while service.traffic.releases["digits-torch"].rule != rolled and time.monotonic() < deadline:
        time.sleep(0.05)
    assert {answer(service)[1] for _ in range(50)} == {1}
    status = control.status("digits-torch")
    event = status["events"][-1]
    assert event["event"] == "rollback" and event["version"] == "2" and event["kind"] == "errors"
    assert event["rule"] == "v1 100%, v2 0%" and event["reason"].startswith("error rate 100.0%")
    assert [v["percent"] for v in status["versions"]] == [100.0, 0.0] and status["versions"][1]["errors"] >= 20
    assert control.roll_back("digits-torch", 2, "errors", "again") is False  # done already: no second event
    assert control.clear("digits-torch", 10)["rule"] is None
    assert service.traffic.releases == {} and not isinstance(service.route(), Routed)
    with pytest.raises(ModelNotFound, match="has no traffic rule"):
        control.clear("digits-torch", 10)


def test_the_admin_endpoints_answer_json(watched: tuple[InferenceService, Any]) -> None:
    _, client = watched
    status = client.get("/v2/repository/models/digits-torch/traffic")
    assert status.status_code == 200 and status.json["rule"] == "v1 90%, v2 10%", status.json
    assert client.get("/v2/repository/models/nope/traffic").status_code == 404
    for body, code in [(b"", 400), (b"[1]", 422), (b'{"rule": 5}', 400), (b'{"rule": "v1, v2"}', 400)]:
        refused = client.post("/v2/repository/models/digits-torch/traffic", data=body,
                              content_type="application/json")
        assert refused.status_code == code and "error" in refused.json, (body, refused.json)


def test_shadow_threads_stop_at_once_dropping_what_waits() -> None:
    busy, release = threading.Semaphore(0), threading.Event()

    def slow(copy: Any) -> None:
        busy.release()
        release.wait(10)

    runner = ShadowRunner(threads=2, capacity=4)
    copy = ShadowCopy(slow, None, X, X, 0.001, 1.0)
    assert runner.submit(copy) and runner.submit(copy)
    assert busy.acquire(timeout=5) and busy.acquire(timeout=5)  # both threads are comparing
    assert all(runner.submit(copy) for _ in range(4)) and runner.depth == 4
    assert runner.submit(copy) is False  # the queue is full: dropped
    began = time.monotonic()
    release.set()
    runner.close(timeout_s=2.0)
    assert time.monotonic() - began < 1.0 and runner.depth == 0
    assert runner.submit(copy) is False  # closed
