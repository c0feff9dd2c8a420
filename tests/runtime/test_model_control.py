"""Models that change while serving: version policies, polling, explicit load and unload.

In process for the planning and the switch (``ModelControl.reconcile`` called directly), and
through real gunicorn with two workers under a bounded load that checks every answer.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import requests

from serving.config import Settings
from serving.runtime.model_control import ModelControl
from serving.runtime.service import InferenceService
from serving.toolchain.data import load_digits_dataset
from tests.conftest import GunicornServer

X = load_digits_dataset(seed=0).x_test[:4].astype(np.float32)


def publish(repo: Path, name: str, version: int, source: int = 1) -> Path:
    """A new version published as train.py and serving import do: staged under a hidden name, then renamed."""
    staging = repo / name / f".staging-{version}"
    shutil.copytree(repo / name / str(source), staging)
    meta = orjson.loads((staging / "metadata.json").read_bytes())
    meta["version"] = version
    (staging / "metadata.json").write_bytes(orjson.dumps(meta))
    os.rename(staging, repo / name / str(version))
    return repo / name / str(version)


def service(repo: Path, **overrides: Any) -> InferenceService:
    settings = Settings.from_env({}, model_repository=repo, model="digits-torch", backend="onnx", workers=1,
                                 model_control="poll", **overrides)
    svc = InferenceService(settings)
    svc.load(workers=1)
    return svc


def served(svc: InferenceService) -> list[tuple[str, int]]:
    return list(svc.served)


def test_a_new_version_is_loaded_then_switched_to_and_the_old_one_retired(repo_copy: Path) -> None:
    svc = service(repo_copy)
    try:
        old = svc.model()
        assert served(svc) == [("digits-torch", 1)]
        publish(repo_copy, "digits-torch", 2)
        ModelControl.of(svc).reconcile(workers=1)
        assert served(svc) == [("digits-torch", 2)] and svc.meta is not None and svc.meta.version == 2
        assert svc.predict(X).shape == (4, 10) and svc.model().meta.version == 2
        assert old.meta.version == 1 and old.batcher is None
        shutil.rmtree(repo_copy / "digits-torch" / "2")  # a removed version folder stops being served
        ModelControl.of(svc).reconcile(workers=1)
        assert served(svc) == [("digits-torch", 1)]
    finally:
        svc.close()


def test_a_broken_new_version_never_replaces_the_working_one(repo_copy: Path) -> None:
    svc = service(repo_copy)
    try:
        broken = publish(repo_copy, "digits-torch", 2)
        (broken / "model.onnx").write_bytes(b"not a model")
        ModelControl.of(svc).reconcile(workers=1)
        assert served(svc) == [("digits-torch", 1)]
        index = {(e["name"], e["version"]): e for e in svc.index()}
        assert index[("digits-torch", "2")]["state"] == "UNAVAILABLE"
        assert "modified after training" in index[("digits-torch", "2")]["reason"]
        assert svc.predict(X).shape == (4, 10)
    finally:
        svc.close()


def test_version_policies(repo_copy: Path) -> None:
    publish(repo_copy, "digits-torch", 2)
    publish(repo_copy, "digits-torch", 3)
    both = service(repo_copy, version_policy="latest:2")
    try:
        ModelControl.of(both).reconcile(workers=1)
        assert served(both) == [("digits-torch", 2), ("digits-torch", 3)] and both.meta.version == 3  # type: ignore[union-attr]
        assert both.model("digits-torch", 2).meta.version == 2
    finally:
        both.close()
    pinned = service(repo_copy, model_version=1, models="digits-tf")
    try:
        ModelControl.of(pinned).reconcile(workers=1)
        assert served(pinned) == [("digits-tf", 1), ("digits-torch", 1)]
    finally:
        pinned.close()
    everything = service(repo_copy, version_policy="all")
    try:
        ModelControl.of(everything).reconcile(workers=1)
        assert served(everything) == [("digits-torch", 1), ("digits-torch", 2), ("digits-torch", 3)]
    finally:
        everything.close()


def test_unload_first_swaps_without_doubling(repo_copy: Path) -> None:
    svc = service(repo_copy, swap="unload_first")
    try:
        publish(repo_copy, "digits-torch", 2)
        ModelControl.of(svc).reconcile(workers=1)
        assert served(svc) == [("digits-torch", 2)]
    finally:
        svc.close()


class Hammer(threading.Thread):
    """A bounded closed-loop client: v2 infer on the unversioned model, every answer checked."""

    def __init__(self, url: str, model: str, seconds: float) -> None:
        super().__init__(daemon=True)
        self.url, self.model, self.seconds = url, model, seconds
        self.answers: list[tuple[float, int, str]] = []  # (time, status, model_version)
        self.failures: list[str] = []

    def run(self) -> None:
        body = orjson.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                         "data": X[0].reshape(-1).tolist()}]})
        deadline = time.monotonic() + self.seconds
        with requests.Session() as session:
            while time.monotonic() < deadline:
                answer = session.post(f"{self.url}/v2/models/{self.model}/infer", data=body, timeout=10,
                                      headers={"Connection": "close"})
                version = answer.json().get("model_version", "") if answer.status_code == 200 else ""
                self.answers.append((time.monotonic(), answer.status_code, version))
                if answer.status_code != 200:
                    self.failures.append(answer.text[:200])


@pytest.fixture(params=["process", "batched"])
def poll_server(request: pytest.FixtureRequest, repo_copy: Path, tmp_path: Path) -> Iterator[GunicornServer]:
    """Two workers polling every 0.5 s; in batched mode a switch moves the model thread and its queue."""
    with GunicornServer(repo_copy, tmp_path, model="digits-torch", backend="onnx", workers=2, mode=request.param,
                        model_control="poll", poll_seconds=0.5) as srv:
        yield srv


@pytest.mark.slow
def test_publishing_under_load_fails_nothing_and_every_worker_switches(poll_server: GunicornServer,
                                                                      repo_copy: Path) -> None:
    hammers = [Hammer(poll_server.url, "digits-torch", 8.0) for _ in range(4)]
    for hammer in hammers:
        hammer.start()
    time.sleep(1.5)
    published = time.monotonic()
    publish(repo_copy, "digits-torch", 2)
    time.sleep(3.0)
    broken = publish(repo_copy, "digits-torch", 3)  # a corrupt version while the load goes on
    (broken / "model.onnx").write_bytes(b"corrupt")
    for hammer in hammers:
        hammer.join(20)
    answers = sorted(a for hammer in hammers for a in hammer.answers)
    assert not [f for hammer in hammers for f in hammer.failures] and len(answers) > 100
    assert {version for _, _, version in answers} == {"1", "2"}
    first_new = min(t for t, _, v in answers if v == "2")
    last_old = max(t for t, _, v in answers if v == "1")
    window = last_old - first_new
    assert first_new > published and window < 0.5 + 2.0, f"workers disagreed for {window:.2f}s"
    assert all(v == "2" for t, _, v in answers if t > last_old)
    index = requests.get(poll_server.url + "/v2/repository/index", timeout=5).json()
    states = {(e["name"], e["version"]): e for e in index}
    assert states[("digits-torch", "2")]["state"] == "READY" and states[("digits-torch", "3")]["state"] == "UNAVAILABLE"
    assert "modified after training" in states[("digits-torch", "3")]["reason"]
    metrics = poll_server.metrics(lambda text: 'serving_model_changes_total{action="unload"' in text)
    assert 'serving_model_changes_total{action="load",outcome="ok"}' in metrics


@pytest.mark.slow
def test_explicit_load_and_unload_act_on_every_worker(repo_copy: Path, tmp_path: Path) -> None:
    with GunicornServer(repo_copy, tmp_path, model="digits-torch", backend="onnx", workers=2, mode="batched",
                        model_control="explicit") as server:
        assert requests.post(server.url + "/v2/models/digits-tf/infer", timeout=5).status_code == 404
        loaded = requests.post(server.url + "/v2/repository/models/digits-tf/load", timeout=60)
        assert loaded.status_code == 200 and loaded.json()["workers"] == 2, loaded.text
        index = {(e["name"], e["version"]): e for e in
                 requests.get(server.url + "/v2/repository/index", timeout=10).json()}
        assert index[("digits-tf", "1")]["state"] == "READY"  # READY only when every worker reports it
        hammers = [Hammer(server.url, "digits-tf", 3.0) for _ in range(4)]
        for hammer in hammers:
            hammer.start()
        time.sleep(1.0)
        unloaded = requests.post(server.url + "/v2/repository/models/digits-tf/unload", timeout=60)
        assert unloaded.status_code == 200 and unloaded.json() == {**unloaded.json(), "loaded": False, "workers": 2}
        for hammer in hammers:
            hammer.join(20)
        statuses = {status for hammer in hammers for _, status, _ in hammer.answers}
        assert 200 in statuses and statuses <= {200, 404, 503}, statuses  # drained, never a 500
        after = [s for hammer in hammers for t, s, _ in hammer.answers if t > time.monotonic() - 0.5]
        assert all(s == 404 for s in after)
        refused = requests.post(server.url + "/v2/repository/models/digits-torch/unload", timeout=10)
        assert refused.status_code == 400 and "native API" in refused.json()["error"]
        missing = requests.post(server.url + "/v2/repository/models/nope/load", timeout=10)
        assert missing.status_code == 404
