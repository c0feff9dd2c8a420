"""Operational handlers: liveness, readiness and Prometheus metrics (routes in
``serving.protocol.endpoints``)."""

from __future__ import annotations

import os

from serving.http.answers import Answer, json_answer
from serving.http.request import RequestState
from serving.observability.metrics import exposition
from serving.runtime.service import InferenceService

_WORKER = {"id": ""}


def worker_id() -> str:
    """An opaque id of this worker process (distinct per worker, stable while it lives); never
    its pid."""
    if not _WORKER["id"]:
        _WORKER["id"] = os.urandom(6).hex()
    return _WORKER["id"]


os.register_at_fork(after_in_child=lambda: _WORKER.update(id=""))


def health(request: RequestState, service: InferenceService) -> Answer:
    """``GET /health``: liveness plus whether this worker's model is loaded (200 while alive)."""
    meta = service.meta
    return json_answer(
        {
            "status": "ok",
            "model_loaded": service.ready,
            "model": meta.name if meta else None,
            "version": meta.version if meta else None,
            "worker": worker_id(),
        }
    )


def live(request: RequestState, service: InferenceService) -> Answer:
    """``GET /health/live``: 200 while the process answers."""
    return json_answer({"status": "alive", "worker": worker_id()})


def ready(request: RequestState, service: InferenceService) -> Answer:
    """``GET /health/ready``: 200 when this worker's models are loaded (and model threads run),
    else 503."""
    if service.ready:
        return json_answer({"status": "ready", "worker": worker_id()})
    return json_answer(
        {"status": "loading", "error": "the model is not loaded yet", "worker": worker_id()}, 503
    )


def metrics(request: RequestState, service: InferenceService) -> Answer:
    """``GET /metrics``: Prometheus text, merged across every gunicorn worker."""
    body, content_type = exposition()
    return Answer(200, body, content_type)
