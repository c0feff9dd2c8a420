"""Canary and shadow traffic under load: the split, stickiness, rollbacks and a shadow, every answer checked.

A server as shipped (two workers, batched mode, the front asked for) serves digits-torch 1 (stable) and three
copies of it under the fault-injecting backend (tests/fakes.py, ``FaultyVersion``): 2 fails every call once a
file exists, 3 is 200 ms slower per call, 4 answers with the classes moved by one. Client threads send
unversioned v2 requests over keep-alive connections and record each answer's status and ``model_version``:

1. split: ``--requests`` requests under ``v1 90%, v2 10%``: each version's observed share against its weight.
2. sticky: requests carrying ``X-User-Id`` from ``--keys`` keys under ``v1 90%, v2 10%, sticky X-User-Id``:
   every key must see one version only.
3. rollback on errors: under load, version 2 starts failing; the time until the rollback event, against the
   window (``SERVING_TRAFFIC_WINDOW_S``); the stable version answers what the candidate fails meanwhile.
4. rollback on latency: the admin API puts ``v1 90%, v3 10%`` in force under load; the time until the slow
   version is rolled back.
5. shadow: ``v1, v4 shadow``: every answer from version 1; the shadow's agreement (0: it always disagrees) and
   latency difference from the traffic status.

Every answer in every phase must be a 200. The suite runs it sized to tens of seconds
(tests/server/test_traffic.py); this script writes ``reports/traffic-<stamp>.md``:

    python -m bench.traffic                                   # 100,000 requests for the split, both fronts
    python -m bench.traffic --requests 20000 --fronts wsgi    # the suite's size
"""

from __future__ import annotations

import argparse
import collections
import http.client
import itertools
import os
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import orjson
import requests

from bench.harness import ROOT, model_server, parse_fronts
from serving.tools.testing import GunicornServer

MODEL = "digits-torch"
FAULTY = "tests.fakes:FaultyVersion"
SAMPLE = [0.0] * 27 + [0.5, 1.0, 0.5] + [0.0] * 34  # any 8x8 input in [0, 1]


class Answer(NamedTuple):
    """One answer a client saw: when (monotonic), its status, the version that answered, the sticky key."""

    at: float
    status: int
    version: str
    key: str


@dataclass
class Load:
    """Client threads sending unversioned v2 requests until stopped (or ``total`` is reached)."""

    url: str
    clients: int = 8
    total: int | None = None
    keys: list[str] = field(default_factory=list)
    answers: list[Answer] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._counter = itertools.count()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(self.clients)]
        self._lock = threading.Lock()

    def start(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> list[Answer]:
        self._stop.set()
        return self.join()

    def join(self, timeout_s: float = 600) -> list[Answer]:
        for thread in self._threads:
            thread.join(timeout_s)
        return sorted(self.answers)

    def _client(self, seed: int) -> None:
        parts = urlsplit(self.url)
        path = f"/v2/models/{MODEL}/infer"
        body = orjson.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": SAMPLE}]})
        rng = random.Random(seed)
        seen: list[Answer] = []
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        try:
            while not self._stop.is_set():
                if self.total is not None and next(self._counter) >= self.total:
                    break
                key = rng.choice(self.keys) if self.keys else ""
                headers = {"Content-Type": "application/json", **({"X-User-Id": key} if key else {})}
                try:
                    connection.request("POST", path, body, headers)
                    response = connection.getresponse()
                    data = response.read()
                except (OSError, http.client.HTTPException) as exc:
                    seen.append(Answer(time.monotonic(), 0, type(exc).__name__, key))
                    connection.close()
                    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
                    continue
                version = orjson.loads(data).get("model_version", "") if response.status == 200 else data[:200].decode()
                seen.append(Answer(time.monotonic(), response.status, version, key))
        finally:
            connection.close()
            with self._lock:
                self.answers.extend(seen)


@contextmanager
def loaded(url: str, clients: int = 6, keys: list[str] | None = None) -> Iterator[Load]:
    """Load running for the duration of the block (stopped and joined after it, whatever happened)."""
    load = Load(url, clients, keys=keys or []).start()
    try:
        yield load
    finally:
        load.stop()


def failures(answers: list[Answer]) -> list[Answer]:
    return [answer for answer in answers if answer.status != 200]


def shares(answers: list[Answer]) -> dict[str, float]:
    counts = collections.Counter(answer.version for answer in answers)
    return {version: counts[version] / len(answers) for version in sorted(counts)}


def build_repository(source: Path, target: Path, fault_file: Path) -> Path:
    """digits-torch 1 from ``source`` and its copies 2 (fails while ``fault_file`` exists), 3 (slow), 4 (wrong)."""
    shutil.copytree(source / MODEL / "1", target / MODEL / "1")
    for version, fault in ((2, {"kind": "raise", "when": str(fault_file)}), (3, {"kind": "slow"}),
                           (4, {"kind": "wrong"})):
        folder = target / MODEL / str(version)
        shutil.copytree(source / MODEL / "1", folder)
        meta = orjson.loads((folder / "metadata.json").read_bytes())
        meta.update(version=version, test_fault=fault)
        (folder / "metadata.json").write_bytes(orjson.dumps(meta))
    return target


def canary_server(front: str, repo: Path, log_dir: Path, window_s: float, **settings: Any) -> GunicornServer:
    """The server every phase runs against: two workers, batched, versions 1 and 2 served by the rule."""
    return model_server(front, repo, log_dir, f"traffic-{front}", model=MODEL, backend=FAULTY, workers=2,
                        mode="batched", models=f"{MODEL}:*", traffic=f"{MODEL}: v1 90%, v2 10%",
                        traffic_window_s=window_s, traffic_min_requests=20, **settings)


def set_rule(url: str, rule: str | None) -> dict[str, Any]:
    path = f"{url}/v2/repository/models/{MODEL}/traffic"
    answer = requests.post(path, json={"rule": rule}, timeout=60) if rule else requests.delete(path, timeout=60)
    answer.raise_for_status()
    body: dict[str, Any] = answer.json()
    return body


def status(url: str) -> dict[str, Any]:
    answer = requests.get(f"{url}/v2/repository/models/{MODEL}/traffic", timeout=10)
    answer.raise_for_status()
    body: dict[str, Any] = answer.json()
    return body


def await_rollback(url: str, version: int, timeout_s: float) -> tuple[float, dict[str, Any]]:
    """Poll the traffic status until ``version`` was rolled back: (when, the event)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        events = [e for e in status(url)["events"] if e["event"] == "rollback" and e["version"] == str(version)]
        if events:
            return time.monotonic(), events[-1]
        time.sleep(0.05)
    raise AssertionError(f"version {version} was not rolled back within {timeout_s}s")


# -- the phases --------------------------------------------------------------------------------------------------
def split_phase(url: str, total: int, clients: int = 8) -> tuple[list[Answer], float]:
    set_rule(url, "v1 90%, v2 10%")
    started = time.monotonic()
    answers = Load(url, clients, total).start().join()
    return answers, time.monotonic() - started


def sticky_phase(url: str, total: int, keys: int, clients: int = 8) -> tuple[list[Answer], dict[str, set[str]]]:
    set_rule(url, "v1 90%, v2 10%, sticky X-User-Id")
    answers = Load(url, clients, total, keys=[f"user-{i}" for i in range(keys)]).start().join()
    versions: dict[str, set[str]] = collections.defaultdict(set)
    for answer in answers:
        versions[answer.key].add(answer.version)
    return answers, versions


def rollback_on_errors(url: str, fault_file: Path, window_s: float) -> tuple[list[Answer], float, dict[str, Any]]:
    """Seconds from the candidate's first failure to its rollback, and the answers meanwhile."""
    set_rule(url, "v1 90%, v2 10%")
    with loaded(url) as load:
        time.sleep(1.0)
        fault_file.touch()
        failing_since = time.monotonic()
        rolled_at, event = await_rollback(url, 2, window_s * 3 + 10)
        time.sleep(1.0)
    return sorted(load.answers), rolled_at - failing_since, event


def rollback_on_latency(url: str, window_s: float) -> tuple[list[Answer], float, dict[str, Any]]:
    """The slow version put in force under load through the admin API: seconds until its rollback."""
    with loaded(url) as load:
        time.sleep(0.5)
        set_rule(url, "v1 90%, v3 10%")
        slow_since = time.monotonic()
        rolled_at, event = await_rollback(url, 3, window_s * 3 + 10)
        time.sleep(1.0)
    return sorted(load.answers), rolled_at - slow_since, event


def shadow_phase(url: str, seconds: float) -> tuple[list[Answer], dict[str, Any]]:
    set_rule(url, "v1, v4 shadow")
    with loaded(url) as load:
        time.sleep(seconds)
    time.sleep(1.0)  # the last copies compared, the windows acknowledged
    return sorted(load.answers), status(url)


# -- the report -------------------------------------------------------------------------------------------------
def run(front: str, source: Path, work: Path, requests_total: int, keys: int, window_s: float) -> list[str]:
    fault_file = work / f"fail-{front}"
    repo = build_repository(source, work / f"models-{front}", fault_file)
    lines = [f"## {front} front", ""]
    with canary_server(front, repo, work, window_s) as server:
        answers, seconds = split_phase(server.url, requests_total)
        observed = shares(answers)
        lines += [f"- split `v1 90%, v2 10%`: {len(answers):,} requests in {seconds:.1f} s"
                  f" ({len(answers) / seconds:,.0f}/s), observed v1 {observed.get('1', 0):.2%},"
                  f" v2 {observed.get('2', 0):.2%}; failed {len(failures(answers))}"]
        answers, versions = sticky_phase(server.url, max(2000, requests_total // 10), keys)
        on_two = sum(v == {"2"} for v in versions.values())
        lines += [f"- sticky: {len(answers):,} requests from {len(versions)} keys; keys that saw more than one"
                  f" version: {sum(len(v) > 1 for v in versions.values())}; keys on v2 {on_two / len(versions):.1%};"
                  f" failed {len(failures(answers))}"]
        answers, delay, event = rollback_on_errors(server.url, fault_file, window_s)
        lines += [f"- rollback on errors: {delay:.2f} s after the candidate began failing (window {window_s:g} s);"
                  f" {len(answers):,} requests meanwhile, failed {len(failures(answers))}; event: {event['reason']}"]
        answers, delay, event = rollback_on_latency(server.url, window_s)
        lines += [f"- rollback on latency: {delay:.2f} s after the slow candidate was put in force (window"
                  f" {window_s:g} s); {len(answers):,} requests, failed {len(failures(answers))}; event:"
                  f" {event['reason']}"]
        answers, state = shadow_phase(server.url, 5.0)
        shadow = state["shadow"]
        lines += [f"- shadow `v1, v4 shadow`: {len(answers):,} requests, answered by"
                  f" {sorted(shares(answers))}, failed {len(failures(answers))}; compared {shadow['compared']:,}"
                  f" samples, agreement {shadow['agreement']}, latency difference {shadow['latency_difference_ms']}"]
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=100_000, help="requests of the split phase")
    parser.add_argument("--keys", type=int, default=500, help="sticky keys")
    parser.add_argument("--window", type=float, default=5.0, help="SERVING_TRAFFIC_WINDOW_S")
    parser.add_argument("--fronts", default="wsgi,asgi")
    parser.add_argument("--models", type=Path, default=ROOT / "models", help="a repository with digits-torch/1")
    args = parser.parse_args(argv)
    if not (args.models / MODEL / "1").is_dir():
        raise SystemExit(f"{args.models / MODEL / '1'} is missing: run `python train.py` first")
    stamp = datetime.now(UTC).strftime("%Y-%m-%d-%H%M")
    lines = [f"# Canary and shadow traffic under load ({stamp} UTC)", "", "`python -m bench.traffic "
             f"--requests {args.requests} --keys {args.keys} --window {args.window:g} --fronts {args.fronts}`", "",
             "Each front: gunicorn with 2 workers, batched mode, digits-torch 1 and its faulty copies 2 (fails"
             " once a file exists), 3 (200 ms slower a call), 4 (answers moved by one class) under"
             " tests.fakes:FaultyVersion;"
             f" SERVING_TRAFFIC_WINDOW_S={args.window:g}, SERVING_TRAFFIC_MIN_REQUESTS=20, the other margins at their"
             " defaults. 8 client threads (the split, sticky keys) or 6 (the other phases) on keep-alive connections,"
             " unversioned v2 requests of one 8x8 sample, every answer checked, on the same"
             f" {os.cpu_count()}-core machine as the server.", ""]
    with tempfile.TemporaryDirectory(prefix="bench-traffic-") as work:
        for front in parse_fronts(args.fronts):
            lines += run(front, args.models, Path(work), args.requests, args.keys, args.window)
            print("\n".join(lines[-7:]), flush=True)
    report = ROOT / "reports" / f"traffic-{stamp}.md"
    report.write_text("\n".join(lines))
    print(f"wrote {report.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
