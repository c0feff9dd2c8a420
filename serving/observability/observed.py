"""What the observability wrappers note about the request being served, in a neutral home.

The fronts' middleware (``serving.fronts.observed``) sets an ``Observation`` for each request when
tracing or payload logging is on; the loaded model's wrapper (``serving.runtime.instruments``) notes
in it which model ran, when, on what and with what result. The middleware reads it back when the
answer is complete, to add the ``decode``/``encode`` spans and to build the payload record. With
both off nothing sets it and nothing reads it. Worker exit flushes whatever registered here
(``at_exit``): the tracer's exporter, the payload writer, the drift window.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("serving")


@dataclass(slots=True, eq=False)
class Observation:
    """One request as the wrappers saw it."""

    started_ns: int
    #: whether anyone reads the model call's times and data (a sampled span, a payload record)
    timed: bool = False
    #: ``name:version`` of the model the request reached, and its labels
    model: str = ""
    labels: list[str] | None = None
    #: epoch nanoseconds: the first model call's start and the last one's end (0: none)
    model_start_ns: int = 0
    model_end_ns: int = 0
    #: what went into the model and came out, one entry per call (payload logging only)
    inputs: list[Any] = field(default_factory=list)
    outputs: list[Any] = field(default_factory=list)


#: The request being observed here (None outside a request, or with tracing and payloads off).
OBSERVATION: ContextVar[Observation | None] = ContextVar("serving_observation", default=None)

_closers: list[Callable[[], None]] = []


def at_exit(close: Callable[[], None]) -> None:
    """Run ``close`` when the worker exits (``serving.host.hooks.drain_worker``)."""
    if close not in _closers:
        _closers.append(close)


def close_all() -> None:
    """Flush every registered writer and exporter; one failing does not stop the others."""
    for close in list(_closers):
        try:
            close()
        except Exception:
            log.exception("flushing observability data at exit failed")
