"""``POST /predict/stream``: classify a posted batch and answer one NDJSON line per sample as it is
ready.

# design: a streaming answer is a sequence of lines, so its handler is a ``StreamingHandler``:
# called like every handler (``handler(request, service) -> Answer``) it returns the lines joined,
# which is what the WSGI app sends (whole, with a Content-Length); the ASGI front
# (``serving.fronts.asgi``) sees the type in the endpoint table and calls ``lines`` instead, sending
# each line as the model produces it. One decoder (``serving.protocol.native``'s), one service call
# per chunk, one encoder: both fronts answer the same bytes, only the timing differs.
#
# The request is decoded before the first line, so a bad body is an ordinary error answer (400, 413,
# 415, 422) on both fronts. The samples then go to the model in chunks of 1, 2, 4, ... samples (at
# most SERVING_MAX_BATCH_SIZE): the first line comes after a one-sample call, and a batch of N costs
# about log2(N) + 1 calls instead of N. In batched mode each chunk goes through the batcher like any
# request, so other clients' samples share its batches. One deadline covers the whole stream.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import numpy as np

from serving.errors import DeadlineExceeded
from serving.http.answers import Answer
from serving.http.encoding import json_bytes
from serving.http.request import RequestState
from serving.protocol.native import decode
from serving.protocol.openapi import INTEGER, NUMBER, STRING, array, obj
from serving.runtime.service import InferenceService, Route

NDJSON = "application/x-ndjson"
#: The schema of one line of the stream (the OpenAPI document's 200 answer describes a line).
LINE = obj(
    ["index", "label", "probabilities"], index=INTEGER, label=STRING, probabilities=array(NUMBER)
) | {
    "description": 'one JSON object per line, in sample order; a line {"error": ...} ends a stream'
    " that failed"
    " after its first line (the status was already sent)"
}
Lines = Callable[..., Iterator[bytes]]


class StreamingHandler:
    """A handler whose answer is a sequence of lines.

    Called, it returns them joined (the WSGI app sends that); ``lines(request, service,
    **path_vars)`` does all the checking up front and returns an iterator that computes each line on
    demand (the ASGI front sends each as it comes).
    """

    def __init__(self, lines: Lines, content_type: str, name: str) -> None:
        self.lines = lines
        self.content_type = content_type
        self.__name__ = self.__qualname__ = name  # Flask names its view after the handler

    def __call__(
        self, request: RequestState, service: InferenceService, **path_vars: str
    ) -> Answer:
        return Answer(200, b"".join(self.lines(request, service, **path_vars)), self.content_type)


def predict_lines(request: RequestState, service: InferenceService) -> Iterator[bytes]:
    """Decode and validate the batch now; return the iterator of its result lines (one version
    answers the whole stream: the one the default model's traffic rule draws, if it has one)."""
    route = service.route(header=request.header)
    request.model = route.label
    batch, _ = decode(request, service, route.meta)
    timeout = request.timeout() or service.settings.request_timeout_ms / 1000.0
    return _classify(batch, service, route, time.monotonic() + timeout)


def _classify(
    batch: np.ndarray, service: InferenceService, route: Route, deadline: float
) -> Iterator[bytes]:
    largest = service.settings.max_batch_size
    start, size = 0, 1
    while start < len(batch):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded(
                f"the stream's deadline passed after {start} of {len(batch)} samples"
            )
        chunk = batch[start : start + size]
        # the service clamps it like any client deadline
        probabilities, model = service.answer(route, chunk, remaining)
        for offset, (label, row) in enumerate(
            zip(model.labels_for(probabilities), probabilities, strict=True)
        ):
            yield (
                json_bytes({"index": start + offset, "label": label, "probabilities": row}) + b"\n"
            )
        start += len(chunk)
        size = min(size * 2, largest)


predict_stream = StreamingHandler(predict_lines, NDJSON, "predict_stream")
