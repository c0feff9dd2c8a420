"""Operational handlers: liveness, readiness and Prometheus metrics (routes in ``serving.endpoints``)."""

from __future__ import annotations

import os

from serving.answers import Answer, json_answer
from serving.observability.metrics import exposition
from serving.request import RequestState
from serving.service import InferenceService


def health(request: RequestState, service: InferenceService) -> Answer:
    """``GET /health``: liveness plus whether this worker's model is loaded (200 while alive)."""
    meta = service.meta
    return json_answer({
        "status": "ok",
        "model_loaded": service.ready,
        "model": meta.name if meta else None,
        "version": meta.version if meta else None,
        "pid": os.getpid(),
    })


def live(request: RequestState, service: InferenceService) -> Answer:
    """``GET /health/live``: 200 while the process answers."""
    return json_answer({"status": "alive", "pid": os.getpid()})


def ready(request: RequestState, service: InferenceService) -> Answer:
    """``GET /health/ready``: 200 when this worker's models are loaded (and model threads run), else 503."""
    if service.ready:
        return json_answer({"status": "ready", "pid": os.getpid()})
    return json_answer({"status": "loading", "error": "the model is not loaded yet", "pid": os.getpid()}, 503)


def metrics(request: RequestState, service: InferenceService) -> Answer:
    """``GET /metrics``: Prometheus text, merged across every gunicorn worker."""
    body, content_type = exposition()
    return Answer(200, body, content_type)
