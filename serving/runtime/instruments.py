"""What observability attaches to a loaded model, by wrapping its calls; nothing when it is off.

# design: ``LoadedModel`` asks this module three things at construction, and nothing per request:
# ``wrap_run`` (the backend call: a ``model`` span when tracing, the drift window's ``observe`` when
# drift is on), ``batcher_class`` (``TracedBatcher`` when tracing: ``queue`` and ``batch`` spans),
# and ``wrap_call`` (a request's model call: noting in the request's ``Observation`` when the model
# ran and on what, for the ``decode``/``encode`` spans and the payload record). With tracing,
# payload logging and drift off (the default) each hands back what it was given, so the request
# path is the same code as without this module, and neither the OpenTelemetry SDK nor the payload
# writer is even imported.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import numpy as np

from serving.config import Settings
from serving.observability.observed import OBSERVATION
from serving.runtime.batching import MicroBatcher, Pending
from serving.store.repository import ModelMetadata

Run = Callable[[np.ndarray], np.ndarray]
Call = Callable[[np.ndarray, float], np.ndarray]


class LoadedModel(Protocol):
    """What the wrappers read of ``serving.runtime.loaded_model.LoadedModel``."""

    label: str
    meta: ModelMetadata

    def run(self, batch: np.ndarray) -> np.ndarray: ...


def wrap_run(model: LoadedModel, settings: Settings) -> Run:
    """The model's backend call, with a ``model`` span and the drift window's note when on."""
    run: Run = model.run
    if settings.drift:
        from serving.observability import drift

        monitor = drift.for_settings(settings)
        window = (
            monitor.window_for(model.label, model.meta.raw.get("reference")) if monitor else None
        )
        if window is not None:
            run = _drifting(run, window.observe)
    if settings.tracing:
        from serving.observability import tracing

        found = tracing.for_settings(settings)
        if found is not None:
            run = _traced(run, found, model.label)
    return run


def _drifting(run: Run, observe: Callable[[np.ndarray, np.ndarray], None]) -> Run:
    def drifting(batch: np.ndarray) -> np.ndarray:
        output = run(batch)
        observe(batch, output)
        return output

    return drifting


def _traced(run: Run, tracing: Any, label: str) -> Run:
    def traced(batch: np.ndarray) -> np.ndarray:
        with tracing.model_span(label, len(batch)):
            return run(batch)

    return traced


def wrap_call(model: LoadedModel, settings: Settings, call: Call) -> Call:
    """A request's model call, noted in its ``Observation`` when tracing or payload logs are on."""
    if not (settings.tracing or settings.payload_log):
        return call
    label, labels = model.label, model.meta.labels
    keep = bool(settings.payload_log)

    def observed(batch: np.ndarray, timeout_s: float) -> np.ndarray:
        observation = OBSERVATION.get()
        if observation is None or not observation.timed:
            return call(batch, timeout_s)
        observation.model, observation.labels = label, labels
        if not observation.model_start_ns:
            observation.model_start_ns = time.time_ns()
        try:
            output = call(batch, timeout_s)
        finally:
            observation.model_end_ns = time.time_ns()
        if keep:
            observation.inputs.append(batch)
            observation.outputs.append(output)
        return output

    return observed


def batcher_class(settings: Settings) -> Callable[..., MicroBatcher]:
    """What builds the model's batcher: a ``TracedBatcher`` when tracing, else ``MicroBatcher``."""
    if settings.tracing:
        from serving.observability import tracing

        found = tracing.for_settings(settings)
        if found is not None:
            return partial(TracedBatcher, tracing=found)
    return MicroBatcher


def _current_context() -> Any:
    from opentelemetry import context

    return context.get_current()


@dataclass(eq=False)
class TracedPending(Pending):
    """A queued request that remembers its trace context (taken on the request's thread)."""

    context: Any = field(default_factory=_current_context)


class TracedBatcher(MicroBatcher):
    """A ``MicroBatcher`` that adds each request's ``queue`` span and a ``batch`` span per batch
    (linked to every request it served), under which the ``model`` span runs."""

    pending_type = TracedPending

    def __init__(self, *args: Any, tracing: Any, name: str = "model", **kwargs: Any) -> None:
        super().__init__(*args, name=name, **kwargs)
        self.label = name
        self.tracing = tracing

    def _execute(self, items: list[Pending]) -> None:
        tracing = self.tracing
        samples = sum(len(item.batch) for item in items)
        requests = [(getattr(item, "context", None), item.enqueued) for item in items]
        span = tracing.batch_spans(self.label, requests, samples)
        if span is None:
            super()._execute(items)
            return
        token = tracing.activate(span)
        try:
            super()._execute(items)
        finally:
            tracing.deactivate(token)
            failed = next((item.error for item in items if item.error is not None), None)
            if failed is not None:
                span.set_attribute("error.type", type(failed).__name__)
            span.end()
