"""Operational endpoints: liveness, readiness and Prometheus metrics.

    GET /health         liveness plus whether this worker's model is loaded (always 200 while alive)
    GET /health/live    200 while the process answers
    GET /health/ready   200 when this worker's model is loaded (and its model thread runs), else 503
    GET /metrics        Prometheus text, merged across every gunicorn worker
"""

from __future__ import annotations

import os

from flask import Blueprint, Response

from serving.http import current_service, json_response
from serving.observability.metrics import exposition

ops = Blueprint("ops", __name__)



@ops.get("/health")
def health() -> Response:
    service = current_service()
    meta = service.meta
    return json_response({
        "status": "ok",
        "model_loaded": service.ready,
        "model": meta.name if meta else None,
        "version": meta.version if meta else None,
        "pid": os.getpid(),
    })


@ops.get("/health/live")
def live() -> Response:
    return json_response({"status": "alive", "pid": os.getpid()})


@ops.get("/health/ready")
def ready() -> Response:
    service = current_service()
    if service.ready:
        return json_response({"status": "ready", "pid": os.getpid()})
    return json_response({"status": "loading", "error": "the model is not loaded yet", "pid": os.getpid()}, 503)


@ops.get("/metrics")
def metrics() -> Response:
    body, content_type = exposition()
    return Response(body, content_type=content_type)
