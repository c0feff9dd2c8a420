"""SERVING_BALANCE_CONNECTIONS: keep-alive connections spread evenly over the gthread workers, through
real gunicorn, and the shared counts behind it."""

from __future__ import annotations

import http.client
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from serving.host import balance
from serving.observability.memory import tree_memory

SAMPLE = json.dumps({"data": [[0.0] * 8 for _ in range(8)]})


@pytest.fixture
def counts(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(balance, "_memory", None)
    monkeypatch.setattr(balance, "_counts", None)
    balance.prepare()
    return balance._counts


def test_a_new_worker_takes_the_lowest_free_slot_and_an_exited_one_frees_it(counts: Any) -> None:
    server = SimpleNamespace(WORKERS={})
    first, second, third = (SimpleNamespace() for _ in range(3))
    for pid, worker in ((1, first), (2, second)):
        balance.assign(server, worker)
        server.WORKERS[pid] = worker
    assert (first.serving_balance_slot, second.serving_balance_slot) == (0, 1)
    balance.publish(0, 5)
    balance.publish(1, 3)
    assert balance.crowded(0, 5) and not balance.crowded(1, 3)
    del server.WORKERS[1]
    balance.release(first)  # its 5 connections count for nobody now
    assert counts[0] == -1 and not balance.crowded(1, 3)
    balance.assign(server, third)
    assert third.serving_balance_slot == 0 and counts[0] == 0  # the slot it left, counted from zero
    assert balance.crowded(1, 3)


def test_a_worker_holding_no_more_than_the_others_accepts_at_once(counts: Any) -> None:
    balance.publish(0, 4)
    balance.publish(1, 4)
    started = time.monotonic()
    balance.yield_to_others(0, 4)
    assert time.monotonic() - started < balance.YIELD_S
    assert not balance.crowded(2, 0)
    balance.yield_to_others(None, 100)  # a worker beyond the slots accepts as gunicorn does


def established_by_worker(master: int, port: int) -> list[int]:
    """Each worker's established connections on ``port`` (from /proc/net/tcp and its fds), fewest first."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
            inodes.add(fields[9])
    found = []
    for process in tree_memory(master):
        if process.role != "worker":
            continue
        held = 0
        for fd in Path(f"/proc/{process.pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except FileNotFoundError:
                continue
            held += target.startswith("socket:[") and target[8:-1] in inodes
        found.append(held)
    return sorted(found)


def open_connections(host: str, port: int, count: int) -> list[http.client.HTTPConnection]:
    """``count`` keep-alive connections opened at once, each answered once and kept open."""

    def one(_: int) -> http.client.HTTPConnection:
        connection = http.client.HTTPConnection(host, port, timeout=10)
        connection.request("POST", "/predict", SAMPLE, {"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        assert response.status == 200
        return connection

    with ThreadPoolExecutor(count) as executor:
        return list(executor.map(one, range(count)))


@contextmanager
def closing_all() -> Iterator[Callable[[list[http.client.HTTPConnection]], list[http.client.HTTPConnection]]]:
    """A function that keeps connections to close at the end, also when an assertion fails on the way (an
    unclosed socket then failed the next test with a ResourceWarning)."""
    opened: list[http.client.HTTPConnection] = []

    def keep(connections: list[http.client.HTTPConnection]) -> list[http.client.HTTPConnection]:
        opened.extend(connections)
        return connections

    try:
        yield keep
    finally:
        for connection in opened:
            connection.close()


@pytest.mark.slow
def test_a_burst_of_keep_alive_connections_splits_evenly_and_a_respawned_worker_takes_its_share(
    server_factory: Any,
) -> None:
    with server_factory(model="digits-tf", backend="onnx", mode="threaded", workers=2) as server, \
            closing_all() as opened:
        host, port = server.url.split("//")[1].rsplit(":", 1)
        connections = opened(open_connections(host, int(port), 24))
        split = established_by_worker(server.pid, int(port))
        assert sum(split) == 24 and split[-1] - split[0] <= 3, split

        victim = next(p.pid for p in tree_memory(server.pid) if p.role == "worker")
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            workers = [p.pid for p in tree_memory(server.pid) if p.role == "worker"]
            if len(workers) == 2 and victim not in workers:
                break
            time.sleep(0.1)
        server.wait_ready(30)
        for connection in connections:
            connection.close()
        opened(open_connections(host, int(port), 12))  # the new worker holds none yet
        opened(open_connections(host, int(port), 12))
        split = established_by_worker(server.pid, int(port))
        assert sum(split) == 24 and split[-1] - split[0] <= 3, split


@pytest.mark.slow
def test_without_the_setting_workers_accept_as_gunicorn_does(server_factory: Any) -> None:
    with server_factory(model="digits-tf", backend="onnx", mode="threaded", workers=2,
                        balance_connections="false") as server, closing_all() as opened:
        host, port = server.url.split("//")[1].rsplit(":", 1)
        opened(open_connections(host, int(port), 8))
        assert sum(established_by_worker(server.pid, int(port))) == 8
