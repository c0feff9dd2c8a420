"""The model pool's priority (``SERVING_POOL_PRIORITY``): the pool's processes run before the HTTP
workers whenever they have work, for models heavy enough that the pool is the server's bottleneck.

# design: every request of every HTTP worker passes through the pool process's one serving thread,
# so that thread is the server's serial step: when it waits for a core, every request waits.
# Measured on 2 cores (reports/pool-cpu-2026-12-06-0706.md): with the HTTP workers' priority, the
# pool thread of the large PyTorch model ran 56-59% of the time and waited 40-44% in the run queue,
# runnable. With a priority of its own it ran 93-98% of the time, for 1.28-1.36x the samples/s of
# batched mode. On a light model the same priority costs: the pool then runs as soon as any
# request arrives, in smaller batches, on the cores the HTTP workers (the bottleneck there) need
# (TensorFlow's digits model: 0.84x, reports/pool-cpu-2026-12-06-0727.md). So ``auto`` times the
# served models once they are loaded and gives the priority when one takes HEAVY_US or more of CPU
# per sample in a batch of 8.
#
# The pool gets the priority by lowering its threads' nice value when the kernel lets it
# (CAP_SYS_NICE, or an RLIMIT_NICE that reaches that far). Otherwise each HTTP worker raises its
# own by as much when the pool's hello tells it to (``serving.runtime.model_pool``): always allowed,
# the same difference between the two, but other processes on the machine then come first too.
# Linux keeps a nice value per thread and a new thread inherits its creator's, so both sides set
# every thread they have and the threads they start later inherit the value.
#
# A pool whose math threads alone could fill every core gets no priority: PyTorch's OpenMP threads
# spin while they wait for work, and at a priority above the HTTP workers they kept those from
# reading the requests the pool waits for (a quarter of the samples/s, 2 math threads on 2 cores).
# So a heavy model loaded on every core (the default) goes down to half of them first where its
# framework can change its threads once loaded (PyTorch, ONNX Runtime); a light model keeps them.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.backends import Backend
from serving.config import Settings, available_cores
from serving.host.sharing import c_library
from serving.runtime.model_pool import set_threads_nice

CAP_SYS_NICE = 23
NICE_MIN, NICE_MAX = -20, 19
#: ``auto``: a served model that takes this long per sample (a batch of 8, the pool's math
#: threads) makes the pool the server's serial step. Measured on 2 cores, 1 math thread: the large
#: digits model 313 us on PyTorch and 166 on ONNX Runtime; the small ones 4-35 us.
HEAVY_US = 100.0
AUTO_LEVELS = 19
TIMING_BATCH, TIMING_CALLS = 8, 5
#: A model whose timed calls took this long in all stops being timed (a start-up cost).
TIMING_BUDGET_S = 0.05


@dataclass(frozen=True)
class Plan:
    """Whose nice value changes, to what, and why (for the log)."""

    pool_nice: int | None  # the pool processes' threads
    worker_nice: int | None  # the HTTP workers'
    reason: str
    crowded: bool = False  # wanted, but the pool's math threads fill every core


def pool_math_threads(settings: Settings) -> int:
    """Intra-op threads per pool process as it loads its models: SERVING_MATH_THREADS, else the
    cores split evenly between the pool's processes."""
    return settings.math_threads or max(1, available_cores() // max(1, settings.pool_processes))


def shared_math_threads(settings: Settings) -> int:
    """Intra-op threads per pool process that leave half the cores to the HTTP workers."""
    return max(1, available_cores() // (2 * max(1, settings.pool_processes)))


def may_lower_nice(target: int) -> bool:
    """Whether this process may set a thread's nice value down to ``target``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:") and int(line.split()[1], 16) >> CAP_SYS_NICE & 1:
                return True
    except (OSError, ValueError):
        pass
    soft, _hard = resource.getrlimit(resource.RLIMIT_NICE)
    limit = 20 if soft == resource.RLIM_INFINITY else soft
    return target >= 20 - limit


def sample_cost_us(models: dict[str, Backend]) -> float:
    """The slowest served model's CPU time per sample, in microseconds: the median of a few calls on
    a batch of ``TIMING_BATCH`` zeros, after a warm-up call (0 for a model that refuses zeros).
    CPU time, not wall time: the pool times its models while the HTTP workers start on the same
    cores (wall time put TensorFlow's digits model at 112 us a sample there, CPU time at 31-51)."""
    slowest = 0.0
    for backend in models.values():
        batch = np.zeros((TIMING_BATCH, *backend.metadata.input_shape), np.float32)
        times = []
        try:
            backend.predict(batch)
            for _ in range(TIMING_CALLS):
                started = time.process_time()
                backend.predict(batch)
                times.append(time.process_time() - started)
                if sum(times) > TIMING_BUDGET_S:  # a slow model is heavy: no need to wait longer
                    break
        except Exception:  # a model whose input is not a float tensor: nothing to time
            continue
        slowest = max(slowest, statistics.median(times) / TIMING_BATCH * 1e6)
    return slowest


def plan(settings: Settings, cost_us: float | None = None, threads: int | None = None) -> Plan:
    """What ``SERVING_POOL_PRIORITY`` does for a pool whose slowest model takes ``cost_us`` per
    sample on ``threads`` math threads per process (None: not known yet, in the master). The
    master, the pool and the HTTP workers inherit one nice value, limits and capabilities, so they
    agree on what is allowed."""
    if not settings.pool_processes:
        return Plan(None, None, "off")
    chosen = settings.pool_priority
    if chosen == "auto":
        if cost_us is None:
            return Plan(
                None, None, f"auto (first for a model of {HEAVY_US:.0f} us or more per sample)"
            )
        if cost_us < HEAVY_US:
            return Plan(
                None,
                None,
                f"the same as the HTTP workers' (auto: the slowest model takes {cost_us:.0f} us"
                f" per sample, under {HEAVY_US:.0f})",
            )
        levels = AUTO_LEVELS
        why = f" (auto: the slowest model takes {cost_us:.0f} us per sample)"
    else:
        levels, why = int(chosen), ""
    if not levels:
        return Plan(None, None, "off")
    used = settings.pool_processes * (threads or pool_math_threads(settings))
    cores = available_cores()
    if used >= cores:
        return Plan(
            None,
            None,
            f"none: the pool's {used} math threads fill the {cores} cores"
            " (it comes first only with cores left to the HTTP workers)",
            crowded=True,
        )
    base = os.getpriority(os.PRIO_PROCESS, 0)
    lowered = max(NICE_MIN, base - levels)
    if may_lower_nice(lowered):
        return Plan(lowered, None, f"the pool's processes at nice {lowered}{why}")
    raised = min(NICE_MAX, base + levels)
    return Plan(
        None,
        raised,
        f"the HTTP workers at nice {raised}{why}; this server may not lower the pool's",
    )


def raise_pool(settings: Settings, models: dict[str, Backend]) -> tuple[Plan, int]:
    """A pool process, its models loaded, before it serves: its threads at the plan's nice value,
    and its models on fewer math threads when they filled the cores; (the plan, the threads)."""
    threads = pool_math_threads(settings)
    needs_timing = settings.pool_priority == "auto" and settings.pool_processes
    cost = sample_cost_us(models) if needs_timing else 0.0
    chosen = plan(settings, cost, threads)
    fewer = shared_math_threads(settings)
    if (
        chosen.crowded
        and not settings.math_threads
        and settings.pool_processes * fewer < available_cores()
    ):
        # The models loaded on every core; they leave half of them to the HTTP workers, where
        # their framework can change its threads (TensorFlow cannot: it keeps them, and no
        # priority). A light model never gets here, and runs as before.
        if all(backend.limit_math_threads(fewer) for backend in models.values()):
            threads = fewer
            chosen = plan(settings, cost, threads)
            # ONNX Runtime made a new session: malloc kept the old one's 40 MB (measured on the
            # large digits model: 102 MB of PSS, 59 after the trim, 62 loaded once)
            c_library().malloc_trim(0)
    if chosen.pool_nice is not None:
        try:
            set_threads_nice(chosen.pool_nice)
        except OSError as exc:  # refused after all (a security module): serve without it
            return Plan(
                None, None, f"none: the kernel refused nice {chosen.pool_nice} ({exc})"
            ), threads
    return chosen, threads
