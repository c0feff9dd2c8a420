"""SERVING_CPU_AFFINITY: each worker, every thread of it, pinned to its own share of the server's cores,
through real gunicorn: respawns and reloads keep the shares spread; off, nothing is pinned."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving import config
from serving.config import Settings
from serving.host.affinity import blocks, choose
from serving.observability.memory import tree_memory

CORES = sorted(os.sched_getaffinity(0))
SAMPLE = {"data": [[0.0] * 8 for _ in range(8)]}


def test_the_cores_split_into_one_block_per_worker_and_leftovers_stay_free() -> None:
    assert blocks([0, 1], 2) == [(0,), (1,)]
    assert blocks([0, 1], 4) == [(0,), (1,)]  # more workers than cores: they share
    assert blocks([0, 1], 1) == [(0, 1)]  # one worker: every core, two math threads
    assert blocks([0, 1, 2, 3], 2) == [(0, 1), (2, 3)]
    assert blocks([0, 1, 2], 2) == [(0,), (1,), (2,)]  # cores // workers = 1 each; the third is spare
    assert blocks([2, 3, 6, 7], 2) == [(2, 3), (6, 7)]  # a container's cpuset, not from 0


def test_a_new_worker_takes_the_block_with_the_fewest_workers() -> None:
    two = [(0,), (1,)]
    assert choose(two, []) == (0,)
    assert choose(two, [(0,)]) == (1,)
    assert choose(two, [(0,), (1,), (1,)]) == (0,)  # after a reload's new workers, as the old ones leave


def test_a_pinned_worker_counts_math_threads_against_the_servers_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "_server_cores", 4)  # as a worker pinned to 2 of 4 cores keeps them
    assert Settings(workers=2).math_threads_for(2) == 2
    assert Settings(workers=4).math_threads_for(4) == 1
    monkeypatch.setattr(config, "_server_cores", None)
    assert Settings(workers=1).math_threads_for(1) == len(CORES)


def thread_cores(pid: int) -> set[str]:
    """The CPU list of every thread of ``pid`` (one entry when they all agree)."""
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
        found.add(status.split("Cpus_allowed_list:")[1].split()[0])
    return found


def cpu_list(block: tuple[int, ...]) -> str:
    """CPUs as /proc writes a list: runs of consecutive CPUs as ranges (0-1,3)."""
    runs: list[list[int]] = []
    for cpu in block:
        if runs and cpu == runs[-1][-1] + 1:
            runs[-1].append(cpu)
        else:
            runs.append([cpu])
    return ",".join(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]) for run in runs)


def serve_both(server: Any) -> None:
    """One HTTP and one gRPC call, so every worker's request threads have started."""
    for _ in range(6):
        assert requests.post(server.url + "/predict", json=SAMPLE, timeout=10).status_code == 200
    with grpc.insecure_channel(server.grpc_target) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert check.status == health_pb2.HealthCheckResponse.SERVING


def workers_of(master: int) -> list[int]:
    return [p.pid for p in tree_memory(master) if p.role == "worker"]


def wait_for(master: int, count: int, gone: set[int]) -> list[int]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = workers_of(master)
        if len(found) == count and not gone & set(found):
            return found
        time.sleep(0.1)
    raise AssertionError(f"workers {workers_of(master)}, expected {count} without {gone}")


@pytest.mark.slow
def test_every_thread_of_every_worker_runs_on_its_own_cores_through_respawns_and_reloads(
    server_factory: Any,
) -> None:
    workers = max(2, len(CORES))
    expected = [cpu_list(block) for block in blocks(CORES, workers)][:workers]
    with server_factory(model="digits-tf", backend="onnx", workers=workers, cpu_affinity="true") as server:
        serve_both(server)
        assert thread_cores(server.pid) == {cpu_list(tuple(CORES))}, "the master stays unpinned"
        pinned = {pid: thread_cores(pid) for pid in workers_of(server.pid)}
        assert all(len(cores) == 1 for cores in pinned.values()), pinned  # every thread, gRPC's included
        assert sorted(next(iter(c)) for c in pinned.values()) == sorted(expected * (workers // len(expected))), pinned
        assert "CPU affinity: each worker pinned to its cores" in server.log()

        victim = workers_of(server.pid)[0]
        victims_cores = pinned[victim]
        os.kill(victim, signal.SIGKILL)
        respawned = set(wait_for(server.pid, workers, {victim})) - set(pinned)
        serve_both(server)
        assert [thread_cores(pid) for pid in respawned] == [victims_cores]  # the block it left

        before = set(workers_of(server.pid))
        os.kill(server.pid, signal.SIGHUP)
        after = wait_for(server.pid, workers, before)
        serve_both(server)
        assert sorted(next(iter(thread_cores(pid))) for pid in after) == sorted(
            expected * (workers // len(expected))
        )


@pytest.mark.slow
def test_without_the_setting_no_worker_is_pinned(server_factory: Any) -> None:
    with server_factory(model="digits-tf", backend="onnx", workers=2) as server:
        serve_both(server)
        for pid in workers_of(server.pid):
            assert thread_cores(pid) == {cpu_list(tuple(CORES))}
        assert "CPU affinity: off" in server.log()
