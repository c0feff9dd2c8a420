"""The Open Inference Protocol's gRPC messages as the REST codec's values, and back.

Grammar, from the spec's ``open_inference_grpc.proto`` (``serving/protocol/v2/proto/``)::

    ModelInferRequest  = {model_name, model_version, id, parameters: map<string, InferParameter>,
                          inputs: [InferInputTensor], outputs: [InferRequestedOutputTensor],
                          raw_input_contents: [bytes]}
    InferInputTensor   = {name, datatype, shape: [int64], parameters, contents: InferTensorContents}
    ModelInferResponse = {model_name, model_version, id, parameters, outputs: [InferOutputTensor],
                          raw_output_contents: [bytes]}

An input's data is either its typed ``contents`` (``fp32_contents`` for FP32, ``int_contents`` for
INT8/16/32, ``uint_contents`` for UINT8/16/32, ``int64_contents``, ``uint64_contents``,
``fp64_contents``, ``bool_contents``, ``bytes_contents`` for BYTES) or, for every input at once,
``raw_input_contents``: one entry per input, in input order, each the row-major little-endian bytes
of its tensor (a BYTES element is a 4-byte little-endian length and its bytes), as in the REST
binary extension. A request uses one form or the other, never both. The answer mirrors it: raw
outputs in ``raw_output_contents`` for a raw request (tritonclient sends raw), typed ``contents``
otherwise. Decoded inputs are ``InputTensor`` values, so ``serving.protocol.v2.tensors`` binds them
to the model exactly as it binds a REST request; every violation is ``InvalidRequest`` (gRPC's
INVALID_ARGUMENT) naming what is wrong.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from serving.errors import InvalidRequest
from serving.protocol.v2.codec import (
    DATATYPES,
    NUMPY_DTYPES,
    InferenceRequest,
    InputTensor,
    OutputTensor,
    RequestedOutput,
    tensor_bytes,
)
from serving.protocol.v2.proto.grpc_service_pb2 import ModelInferRequest, ModelInferResponse

#: The ``InferTensorContents`` field that carries each datatype (FP16 and BF16 travel raw only).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
#: The numpy type a contents field's values come as.
CONTENTS_DTYPE = {
    "bool_contents": np.bool_,
    "int_contents": np.int32,
    "int64_contents": np.int64,
    "uint_contents": np.uint32,
    "uint64_contents": np.uint64,
    "fp32_contents": np.float32,
    "fp64_contents": np.float64,
}
#: Most values a typed contents field may hold: a protobuf message is capped by the server's
#: message size limit already; this bounds the array built from it as well.
MAX_VALUES = 1 << 26


def parameters(entries: Any, where: str) -> dict[str, Any]:
    """A ``map<string, InferParameter>`` as a plain dict (the value of each one's set field)."""
    values = {}
    for key, parameter in entries.items():
        choice = parameter.WhichOneof("parameter_choice")
        if choice is None:
            raise InvalidRequest(f"{where} parameter {key!r} has no value")
        values[key] = getattr(parameter, choice)
    return values


def decode_infer(message: ModelInferRequest) -> InferenceRequest:
    """The request's inputs and requested outputs as the REST codec's ``InferenceRequest``."""
    raw = message.raw_input_contents
    if not message.inputs:
        raise InvalidRequest("'inputs' must be a non-empty list of tensors")
    if raw and len(raw) != len(message.inputs):
        raise InvalidRequest(
            f"raw_input_contents has {len(raw)} entries for {len(message.inputs)} inputs: send one"
            " per input, in input order, or use typed contents for every input"
        )
    request_parameters = parameters(message.parameters, "request")
    timeout = request_parameters.get("timeout")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int) or not 1_000 <= timeout <= 6e8
    ):
        raise InvalidRequest(
            "parameter 'timeout' must be a whole number of microseconds in [1000, 600000000]"
        )
    tensors = [_input(tensor, raw[i] if raw else None) for i, tensor in enumerate(message.inputs)]
    return InferenceRequest(
        id=message.id or None,
        inputs=tensors,
        outputs=[_output(output) for output in message.outputs] or None,
        binary_output=bool(raw),
        timeout_s=None if timeout is None else timeout / 1_000_000,
        parameters=request_parameters,
    )


def _input(tensor: Any, raw: bytes | None) -> InputTensor:
    name, datatype = tensor.name, tensor.datatype
    if datatype not in DATATYPES:
        raise InvalidRequest(
            f"input {name!r}: unknown datatype {datatype!r}; expected one of {', '.join(DATATYPES)}"
        )
    shape = tuple(tensor.shape)
    if any(d < 0 for d in shape):
        raise InvalidRequest(f"input {name!r}: 'shape' must hold non-negative whole numbers")
    if any(key.startswith("shared_memory") for key in tensor.parameters):
        raise InvalidRequest(
            f"input {name!r}: shared memory is not supported; send the data in the message"
        )
    decoded = InputTensor(name, datatype, shape)
    if raw is not None:
        if tensor.HasField("contents"):
            raise InvalidRequest(f"input {name!r} has both contents and raw_input_contents")
        dtype = NUMPY_DTYPES.get(datatype)
        if dtype is not None and len(raw) != math.prod(shape) * dtype.itemsize:
            raise InvalidRequest(
                f"input {name!r}: its raw_input_contents entry holds {len(raw)} bytes but shape"
                f" {list(shape)} of {datatype} needs {math.prod(shape) * dtype.itemsize}"
            )
        decoded.raw = memoryview(raw)
        return decoded
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidRequest(f"input {name!r}: {datatype} data travels in raw_input_contents only")
    values = getattr(tensor.contents, field)
    count = math.prod(shape)
    if len(values) != count or count > MAX_VALUES:
        raise InvalidRequest(
            f"input {name!r}: shape {list(shape)} holds {count} values but contents.{field} has"
            f" {len(values)}"
        )
    if datatype == "BYTES":
        decoded.data = list(values)
    else:
        decoded.data = np.asarray(values, dtype=CONTENTS_DTYPE[field])
    return decoded


def _output(output: Any) -> RequestedOutput:
    if any(key == "classification" or key.startswith("shared_memory") for key in output.parameters):
        raise InvalidRequest(
            f"output {output.name!r}: classification and shared memory are not supported"
        )
    return RequestedOutput(output.name)


def encode_infer(
    model_name: str, model_version: str, request_id: str, outputs: Sequence[OutputTensor], raw: bool
) -> ModelInferResponse:
    """The answer: each output's metadata, its data raw (``raw_output_contents``) or typed."""
    response = ModelInferResponse(model_name=model_name, model_version=model_version, id=request_id)
    for tensor in outputs:
        entry = response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        if raw:
            response.raw_output_contents.append(tensor_bytes(tensor))
        elif isinstance(tensor.values, np.ndarray):
            values = tensor.values.reshape(-1).tolist()
            getattr(entry.contents, CONTENTS_FIELD[tensor.datatype]).extend(values)
        else:
            entry.contents.bytes_contents.extend(value.encode() for value in tensor.values)
    return response
