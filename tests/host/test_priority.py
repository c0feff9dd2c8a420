"""SERVING_POOL_PRIORITY: the model pool's processes come before the HTTP workers, through real gunicorn:
the pool's threads at a lower nice value where the kernel allows it, the HTTP workers' higher where it does
not, respawned processes alike; auto only for a heavy model; none while the pool's math threads fill the
cores; 0 = off."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from serving.config import Settings
from serving.host import priority
from serving.host.priority import plan, pool_math_threads, raise_pool, shared_math_threads
from serving.observability.memory import tree_memory

SAMPLE = {"data": [[0.0] * 8 for _ in range(8)]}
CORES = len(os.sched_getaffinity(0))
BASE = os.getpriority(os.PRIO_PROCESS, 0)


def pool_settings(**values: Any) -> Settings:
    return Settings(**{"model_pool": "1", "workers": 2, **values})


def test_the_pool_loads_on_every_core_and_can_leave_half_of_them(monkeypatch: pytest.MonkeyPatch) -> None:
    for cores, processes, loaded, shared in ((2, 1, 2, 1), (4, 1, 4, 2), (8, 2, 4, 2), (1, 1, 1, 1), (2, 4, 1, 1)):
        monkeypatch.setattr(priority, "available_cores", lambda cores=cores: cores)
        settings = pool_settings(model_pool=str(processes))
        assert (pool_math_threads(settings), shared_math_threads(settings)) == (loaded, shared), (cores, processes)
    assert pool_math_threads(pool_settings(math_threads=3)) == 3  # SERVING_MATH_THREADS decides


def test_the_plan_lowers_the_pools_nice_value_where_allowed_else_raises_the_workers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(priority, "available_cores", lambda: 2)
    monkeypatch.setattr(priority, "may_lower_nice", lambda target: True)
    allowed = plan(pool_settings(pool_priority="19"), 5.0, 1)
    assert (allowed.pool_nice, allowed.worker_nice) == (max(-20, BASE - 19), None)
    assert plan(pool_settings(pool_priority="5"), 5.0, 1).pool_nice == max(-20, BASE - 5)
    monkeypatch.setattr(priority, "may_lower_nice", lambda target: False)
    refused = plan(pool_settings(pool_priority="19"), 5.0, 1)
    assert (refused.pool_nice, refused.worker_nice) == (None, min(19, BASE + 19))
    assert "may not lower" in refused.reason


def test_auto_puts_the_pool_first_for_a_heavy_model_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(priority, "available_cores", lambda: 2)
    monkeypatch.setattr(priority, "may_lower_nice", lambda target: True)
    heavy = plan(pool_settings(), 313.0, 1)  # the large digits model on PyTorch, one math thread
    assert heavy.pool_nice == max(-20, BASE - 19) and "313 us per sample" in heavy.reason
    light = plan(pool_settings(), 35.0, 1)  # the digits model on TensorFlow: the HTTP side is the bottleneck
    assert (light.pool_nice, light.worker_nice) == (None, None) and "under 100" in light.reason
    assert plan(pool_settings()).pool_nice is None  # the master: nothing is timed there


class Slow:
    """A backend whose every call takes 2 ms of CPU, for any batch: 250 us per sample in a batch of 8."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.metadata = type("Meta", (), {"input_shape": shape})()
        self.seen: list[tuple[int, ...]] = []

    def predict(self, batch: Any) -> Any:
        self.seen.append(batch.shape)
        until = time.thread_time() + 0.002  # CPU time of this thread: the same under contention
        while time.thread_time() < until:
            pass
        return batch


class Refusing(Slow):
    def predict(self, batch: Any) -> Any:
        raise ValueError("this model takes strings")


def test_the_slowest_model_is_timed_on_a_batch_of_zeros() -> None:
    slow, fast = Slow((8, 8)), Slow((3,))
    fast.predict = lambda batch: batch  # type: ignore[method-assign]
    cost = priority.sample_cost_us({"a:1": fast, "b:1": slow, "c:1": Refusing((2,))})  # type: ignore[dict-item]
    # CPU time of the whole process: at least the 2 ms of CPU this thread burned per call (other
    # threads of the test process, a framework's spinning pool, may add to it)
    assert cost >= 240, cost
    assert set(slow.seen) == {(8, 8, 8)} and len(slow.seen) == 1 + priority.TIMING_CALLS


def test_no_priority_without_a_pool_when_off_or_when_its_math_threads_fill_the_cores(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(priority, "available_cores", lambda: 2)
    monkeypatch.setattr(priority, "may_lower_nice", lambda target: True)
    for settings in (Settings(model_pool="0"), pool_settings(pool_priority="0")):
        assert plan(settings, 500.0, 1) == priority.Plan(None, None, "off")
    full = plan(pool_settings(), 500.0, 2)  # spinning math threads ahead of the workers: a quarter
    assert (full.pool_nice, full.worker_nice) == (None, None) and "fill the 2 cores" in full.reason
    assert plan(pool_settings(model_pool="2"), 500.0, 1).pool_nice is None  # 2 processes x 1 thread fill 2 cores


class Fixed(Slow):
    """A heavy model whose framework cannot change its threads once loaded (TensorFlow)."""


class Limited(Slow):
    """A heavy model whose framework can (PyTorch, ONNX Runtime)."""

    def limit_math_threads(self, threads: int) -> bool:
        self.threads = threads
        return True


Fixed.limit_math_threads = lambda self, threads: False  # type: ignore[attr-defined]


def test_a_heavy_model_loaded_on_every_core_leaves_half_of_them_then_comes_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(priority, "available_cores", lambda: 2)
    monkeypatch.setattr(priority, "may_lower_nice", lambda target: False)  # nothing set in this process
    heavy = Limited((8, 8))
    chosen, threads = raise_pool(pool_settings(), {"large:1": heavy})  # type: ignore[dict-item]
    assert threads == 1 and heavy.threads == 1 and chosen.worker_nice == min(19, BASE + 19), chosen
    fixed = Fixed((8, 8))
    chosen, threads = raise_pool(pool_settings(), {"tf:1": fixed})  # type: ignore[dict-item]
    assert threads == 2 and chosen.worker_nice is None and "fill the 2 cores" in chosen.reason, chosen
    chosen, threads = raise_pool(pool_settings(math_threads=2), {"large:1": Limited((8, 8))})  # type: ignore[dict-item]
    assert threads == 2 and chosen.worker_nice is None  # SERVING_MATH_THREADS is the operator's word
    light = Limited((8, 8))
    light.predict = lambda batch: batch  # type: ignore[method-assign]
    chosen, threads = raise_pool(pool_settings(), {"small:1": light})  # type: ignore[dict-item]
    assert threads == 2 and not hasattr(light, "threads") and "under 100" in chosen.reason  # runs as before


def nice_values(pid: int) -> set[int]:
    """The nice value of every thread of ``pid``."""
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found.add(os.getpriority(os.PRIO_PROCESS, int(task.name)))
        except ProcessLookupError:  # a thread that ended meanwhile
            continue
    return found


def by_role(master: int) -> dict[str, list[set[int]]]:
    roles: dict[str, list[set[int]]] = {}
    for process in tree_memory(master):
        roles.setdefault(process.role, []).append(nice_values(process.pid))
    return roles


def warm(url: str, count: int = 20) -> None:
    for _ in range(count):
        reply = requests.post(url + "/predict", json=SAMPLE, timeout=10)
        assert reply.status_code == 200, reply.text


def replaced(master: int, role: str, victim: int) -> int:
    """Kill ``victim`` and wait for the process that replaces it."""
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = [p.pid for p in tree_memory(master) if p.role == role and p.pid != victim]
        if len(found) == (1 if role == "pool" else 2):
            return next(pid for pid in found if pid != victim)
        time.sleep(0.1)
    raise AssertionError(f"no {role} replaced {victim}")


def may_lower_here() -> bool:
    return priority.may_lower_nice(max(-20, BASE - 19))


@pytest.mark.slow
@pytest.mark.skipif(CORES < 2, reason="with one core the pool's math thread fills it: no priority")
def test_every_thread_of_the_pool_runs_ahead_of_the_workers_and_so_does_its_replacement(
    server_factory: Any,
) -> None:
    if not may_lower_here():
        pytest.skip("this test process may not lower a nice value (no CAP_SYS_NICE): the next test covers it")
    lowered = max(-20, BASE - 19)
    with server_factory(model="digits-tf", backend="onnx", workers=2, mode="threaded", model_pool=1,
                        pool_priority=19) as server:
        warm(server.url)
        roles = by_role(server.pid)
        assert roles["pool"] == [{lowered}], roles  # every thread, the framework's too
        assert roles["worker"] == [{BASE}, {BASE}] and roles["master"] == [{BASE}], roles
        assert f"priority: the pool's processes at nice {lowered}" in server.log()
        [pool] = [p.pid for p in tree_memory(server.pid) if p.role == "pool"]
        respawned = replaced(server.pid, "pool", pool)
        time.sleep(1)  # its models load
        warm(server.url)
        assert nice_values(respawned) == {lowered}


@pytest.mark.slow
@pytest.mark.skipif(CORES < 2, reason="with one core the pool's math thread fills it: no priority")
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="dropping a capability takes root")
def test_without_the_right_to_lower_a_nice_value_the_workers_raise_theirs(server_factory: Any) -> None:
    raised = min(19, BASE + 19)
    server = server_factory(model="digits-tf", backend="onnx", workers=2, mode="threaded", model_pool=1,
                            pool_priority=19)
    # as in a container without CAP_SYS_NICE (Docker's default), and RLIMIT_NICE at its default 0
    server.command = ["setpriv", "--inh-caps=-sys_nice", "--bounding-set=-sys_nice", *server.command]
    with server:
        warm(server.url)
        roles = by_role(server.pid)
        assert roles["pool"] == [{BASE}] and roles["master"] == [{BASE}], roles
        assert roles["worker"] == [{raised}, {raised}], roles  # every thread, gRPC's included
        assert f"the HTTP workers at nice {raised}; this server may not lower the pool's" in server.log()
        worker = next(p.pid for p in tree_memory(server.pid) if p.role == "worker")
        respawned = replaced(server.pid, "worker", worker)
        warm(server.url)
        assert nice_values(respawned) == {raised}


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["0", "auto"])
def test_off_or_auto_on_a_light_model_every_process_keeps_its_nice_value(server_factory: Any, setting: str) -> None:
    with server_factory(model="digits-tf", backend="onnx", workers=2, mode="threaded", model_pool=1,
                        pool_priority=setting) as server:
        warm(server.url)
        assert all(values == [{BASE}] * len(values) for values in by_role(server.pid).values())
        expected = "priority: off" if setting == "0" else "us per sample, under 100)"
        assert expected in server.log(), server.log()[-2000:]
