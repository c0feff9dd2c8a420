"""The classic Flask MNIST client contract, for clients that must not change.

    POST /inference {"images": <H x W nested 0-255 numbers>} -> 7 (text/plain, the label index) POST
    /inference/ the same -> 7 (JSON number; the Swagger variant)

A batch (``[N, H, W]``) answers one label per line, or a JSON array. The body is exactly what the
tutorial's ``str(np.argmax(model.predict(...)))`` gave: the index of the most probable class. Pixels
are 8-bit intensities (0 background, 255 ink), converted exactly to the model's input range; all
validation, limits, errors (JSON 4xx), request ids, metrics, deadlines and batching are the native
API's, through the same ``batch_from_data`` and ``service.predict``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from serving.errors import InvalidInput, UnsupportedMediaType
from serving.http.answers import Answer, json_answer
from serving.http.encoding import parse_json_object
from serving.http.request import RequestState
from serving.protocol.inputs import PIXELS_8BIT, batch_from_data
from serving.runtime.service import InferenceService


def inference_text(request: RequestState, service: InferenceService) -> Answer:
    """``POST /inference``: the label index as the whole text body (one per line for a batch)."""
    indices, _ = _predict(request, service)
    return Answer(200, "\n".join(str(i) for i in indices).encode(), "text/plain; charset=utf-8")


def inference_json(request: RequestState, service: InferenceService) -> Answer:
    """``POST /inference/``: the label index as a JSON number (a JSON array for a batch)."""
    indices, single = _predict(request, service)
    return json_answer(indices[0] if single else indices)


def _predict(request: RequestState, service: InferenceService) -> tuple[list[int], bool]:
    mimetype = request.mimetype
    if mimetype != "application/json" and not mimetype.endswith("+json"):
        raise UnsupportedMediaType(
            f"Content-Type {mimetype!r} is not accepted: send application/json with"
            ' {"images": [[0-255, ...], ...]}'
        )
    payload = parse_json_object(request.body(service.body_limit))
    if "images" not in payload:
        raise InvalidInput(
            'the JSON object needs an "images" field: {"images": <H x W pixels, 0-255>}'
        )
    images: Any = payload["images"]
    route = service.route(header=request.header)
    request.model = route.label
    meta = route.meta
    if not meta.is_image:
        raise InvalidInput(
            f"/inference takes images; model {meta.name} takes {meta.describe_input()}: send them"
            ' to POST /predict as {"data": [[...], ...]}'
        )
    batch = batch_from_data(images, meta, service.settings.max_batch, pixel_range=PIXELS_8BIT)
    request.batch_size = len(batch)
    probabilities, model = service.answer(route, batch, request.timeout())
    request.model = model.label
    return np.argmax(probabilities, axis=1).tolist(), _is_single(images, meta.input_shape)


def _is_single(images: Any, shape: tuple[int, ...]) -> bool:
    """One image (``[H][W]`` or flat ``[H*W]``), not a batch (``[N][H][W]`` or ``[N][H*W]``)."""
    first = images[0] if isinstance(images, list) and images else None
    if not isinstance(first, list):
        return True  # flat
    return len(first) != shape[0] * shape[1] and not (first and isinstance(first[0], list))
