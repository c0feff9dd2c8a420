"""Binding v2 tensors to a served model: its metadata, input tensor -> batch, probabilities ->
outputs.

A model takes one input: an image model ``[-1, H, W]`` (also accepted flat, ``[-1, H*W]``), a
feature model ``[-1, N]``, FP32, with values in its input range (when it has one). FP64 and FP16
are converted to FP32; integer datatypes are converted when every value is exactly representable as
FP32 (|v| <= 2**24); for an image model UINT8 tensors are 8-bit pixels, 0-255, mapped exactly onto
the model's input range (for a feature model they are the values as they are). BOOL, BYTES and
BF16 are refused naming the input. After that the batch goes through
``serving.protocol.inputs.check_batch``, the same checks (batch size, NaN, range) as the native API.
Outputs: ``probabilities`` (FP32 ``[-1, classes]``, the model's output name) and ``label`` (BYTES
``[-1]``, the most probable class).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from serving.backends import backend_class
from serving.errors import InvalidRequest
from serving.http.request import RequestState
from serving.protocol.inputs import PIXELS_8BIT, check_batch, rescale
from serving.protocol.v2.codec import InferenceRequest, OutputTensor, RequestedOutput, input_array
from serving.runtime.loaded_model import LoadedModel, Route
from serving.runtime.service import InferenceService
from serving.store.repository import ModelMetadata

LABEL_OUTPUT = "label"
CONVERTED = (
    "FP32",
    "FP64",
    "FP16",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
)
EXACT_INT = 2**24  # the largest integer magnitude float32 holds exactly


def model_metadata(model: LoadedModel, versions: list[int]) -> dict[str, Any]:
    """``$metadata_model_response``: name, versions, platform, inputs and outputs (-1 = batch)."""
    meta = model.meta
    return {
        "name": meta.name,
        "versions": [str(v) for v in versions],
        # the served backend's, also when the model pool runs it
        "platform": backend_class(model.backend_name).platform,
        "inputs": [{"name": meta.input_name, "datatype": "FP32", "shape": [-1, *meta.input_shape]}],
        "outputs": [
            {"name": meta.output_name, "datatype": "FP32", "shape": [-1, len(meta.labels)]},
            {"name": LABEL_OUTPUT, "datatype": "BYTES", "shape": [-1]},
        ],
    }


def batch_from_request(
    request: InferenceRequest, meta: ModelMetadata, max_batch: int
) -> np.ndarray:
    """The validated float32 batch ``(N, H, W)`` the request's one input holds."""
    names = [tensor.name for tensor in request.inputs]
    if names != [meta.input_name]:
        unknown = [name for name in names if name != meta.input_name]
        detail = (
            f"unknown input {unknown[0]!r}"
            if unknown
            else f"input {meta.input_name!r} is given twice"
        )
        raise InvalidRequest(
            f"{detail}: model {meta.name} takes exactly one input, {meta.input_name!r}"
        )
    tensor = request.inputs[0]
    if tensor.datatype not in CONVERTED:
        raise InvalidRequest(
            f"input {tensor.name!r}: datatype {tensor.datatype} is not accepted; send FP32 (FP64, "
            "FP16 and"
            " integer types are converted)"
        )
    shape = tensor.shape
    size = meta.sample_size
    if len(shape) < 2 or shape[1:] not in (tuple(meta.input_shape), (size,)):
        accepted = f"[-1, {size}]"
        if meta.is_image:
            accepted = f"[-1, {meta.input_shape[0]}, {meta.input_shape[1]}] (or {accepted})"
        raise InvalidRequest(
            f"input {tensor.name!r} has shape {list(shape)}; model {meta.name} takes {accepted}"
        )
    array = input_array(tensor)
    if (
        array.dtype.kind in "iu"
        and array.size
        and (array.max() > EXACT_INT or array.min() < -EXACT_INT)
    ):
        raise InvalidRequest(
            f"input {tensor.name!r}: integer values beyond 2**24 are not exact in FP32"
        )
    batch = array.reshape(shape[0], *meta.input_shape)
    # 8-bit pixels: converted exactly to the model's input range
    if tensor.datatype == "UINT8" and meta.is_image:
        batch = rescale(batch, PIXELS_8BIT, meta.input_range)
    batch = check_batch(batch, meta, max_batch)
    # a view of the request body is read-only
    return batch if batch.flags.writeable else batch.copy()


def output_tensors(
    request: InferenceRequest, model: LoadedModel, probabilities: np.ndarray
) -> list[tuple[OutputTensor, bool]]:
    """The outputs the request asked for (all when it named none), each with whether to send it
    binary."""
    meta = model.meta
    wanted = request.outputs or [RequestedOutput(meta.output_name), RequestedOutput(LABEL_OUTPUT)]
    outputs = []
    for requested in wanted:
        if requested.name == meta.output_name:
            tensor = OutputTensor(
                meta.output_name, "FP32", list(probabilities.shape), probabilities
            )
        else:  # names were checked by ``check_outputs`` before the model ran
            tensor = OutputTensor(
                LABEL_OUTPUT, "BYTES", [len(probabilities)], model.labels_for(probabilities)
            )
        outputs.append(
            (tensor, request.binary_output if requested.binary is None else requested.binary)
        )
    return outputs


def answer_decoded(
    request: RequestState, service: InferenceService, route: Route, decoded: InferenceRequest
) -> tuple[np.ndarray, LoadedModel]:
    """Run a decoded v2 request (REST or gRPC) on the version ``route`` names: its requested outputs
    checked, its batch built, the call's own deadline or else the one in its parameters; the
    probabilities and the version that answered."""
    check_outputs(decoded, route.meta)
    batch = batch_from_request(decoded, route.meta, service.settings.max_batch)
    request.batch_size = len(batch)
    timeout = request.timeout()
    if timeout is None and decoded.timeout_s:
        timeout, request.client_deadline = decoded.timeout_s, True
    probabilities, model = service.answer(route, batch, timeout)
    request.model = model.label
    return probabilities, model


def check_outputs(request: InferenceRequest, meta: ModelMetadata) -> None:
    """Refuse unknown output names before running the model."""
    for requested in request.outputs or []:
        if requested.name not in (meta.output_name, LABEL_OUTPUT):
            raise InvalidRequest(
                f"unknown output {requested.name!r}: model {meta.name} has {meta.output_name!r} "
                f"and {LABEL_OUTPUT!r}"
            )
