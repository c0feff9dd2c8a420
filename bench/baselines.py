"""Minimal baseline apps for bench/asgi.py: the same ONNX model call behind plain Flask, FastAPI and Starlette.

Each parses ``{"data": [64 floats]}``, runs one ONNX Runtime call (one math thread, session created in
the worker after fork) and answers the model's probabilities as JSON: what the model server does per
request, without its validation, request ids, access log, metrics or auth. They are the folklore
stacks a user would write by hand ("Flask + gunicorn" and "FastAPI + uvicorn"), plus Starlette, which
is FastAPI without its validation layer: the figures that decide whether the ASGI front is worth
building on one of them. The model comes from ``BASELINE_MODEL`` (a model.onnx path).

    gunicorn -w 2 -k sync bench.baselines:flask_app
    uvicorn --workers 2 bench.baselines:fastapi_app
"""

from __future__ import annotations

import os
from functools import cache
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI
from flask import Flask, jsonify, request
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


@cache
def _session(pid: int) -> Any:
    """One ONNX Runtime session per process (the pid keys the cache, so a forked worker makes its own)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(os.environ["BASELINE_MODEL"], options, providers=["CPUExecutionProvider"])


def predict(data: Any) -> list[list[float]]:
    """The model call every baseline makes: 64 values in, 10 probabilities out."""
    batch = np.asarray(data, dtype=np.float32).reshape(1, 1, 8, 8)
    output: np.ndarray = _session(os.getpid()).run(None, {"input": batch})[0]
    return output.tolist()  # type: ignore[no-any-return]


flask_app = Flask("baseline")


@flask_app.post("/predict")
def flask_predict() -> Any:
    return jsonify({"prediction": predict(request.get_json()["data"])})


class Sample(BaseModel):
    """FastAPI's validation of the body: a list of numbers."""

    data: list[float]


fastapi_app = FastAPI()


@fastapi_app.post("/predict")
def fastapi_predict(sample: Sample) -> dict[str, Any]:  # a plain def: FastAPI runs it in its thread pool
    return {"prediction": predict(sample.data)}


async def starlette_predict(incoming: Request) -> Response:
    from starlette.concurrency import run_in_threadpool

    payload = orjson.loads(await incoming.body())
    result = await run_in_threadpool(predict, payload["data"])
    return Response(orjson.dumps({"prediction": result}), media_type="application/json")


starlette_app = Starlette(routes=[Route("/predict", starlette_predict, methods=["POST"])])
