"""The Open Inference Protocol (v2) wire format: JSON tensors and the binary tensor data extension.

Grammar, from the spec::

    $inference_request  = {"id": $string #optional, "parameters": $parameters #optional,
                           "inputs": [$request_input, ...], "outputs": [$request_output, ...]
                           #optional}
    $request_input      = {"name": $string, "shape": [$number, ...], "datatype": $string,
                           "parameters": $parameters #optional, "data": $tensor_data}
    $request_output     = {"name": $string, "parameters": $parameters #optional}
    $inference_response = {"model_name": $string, "model_version": $string #optional, "id": $string,
                           "parameters": $parameters #optional, "outputs": [$response_output, ...]}
    $response_output    = {"name": $string, "shape": [$number, ...], "datatype": $string,
                           "parameters": $parameters #optional, "data": $tensor_data}

Binary tensor data extension: the body is the JSON header (its byte length in the
``Inference-Header-Content-Length`` header) followed by raw row-major little-endian tensors, one per
input whose ``parameters.binary_data_size`` gives its size, in input order. Responses do the same
for outputs asked with ``parameters.binary_data`` (or all, with ``binary_data_output``); a BYTES
element is a 4-byte little-endian length followed by its bytes. Every violation is a 400 naming what
is wrong.
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import orjson

from serving.errors import InvalidRequest
from serving.http.encoding import json_bytes

HEADER_LENGTH = "Inference-Header-Content-Length"
DIGITS = re.compile(r"^[0-9]{1,12}$")
#: Fixed-size datatypes and their little-endian numpy dtypes; BYTES and BF16 have none.
NUMPY_DTYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(code)
    for name, code in (
        ("BOOL", "?"),
        ("UINT8", "<u1"),
        ("UINT16", "<u2"),
        ("UINT32", "<u4"),
        ("UINT64", "<u8"),
        ("INT8", "<i1"),
        ("INT16", "<i2"),
        ("INT32", "<i4"),
        ("INT64", "<i8"),
        ("FP16", "<f2"),
        ("FP32", "<f4"),
        ("FP64", "<f8"),
    )
}
DATATYPES = (*NUMPY_DTYPES, "BF16", "BYTES")
#: The numpy kinds JSON values may parse to, per datatype kind (JSON integers are fine for floats).
JSON_KINDS = {"f": "fiu", "i": "iu", "u": "iu", "b": "b"}


@dataclass
class InputTensor:
    """One request input: JSON ``data`` or a slice of the binary section (``raw``), not yet
    checked."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: Any = None
    raw: memoryview | None = None


@dataclass
class RequestedOutput:
    """One entry of ``outputs``: the name, and whether it must come back binary (None: the
    default)."""

    name: str
    binary: bool | None = None


@dataclass
class InferenceRequest:
    """A decoded infer request."""

    id: str | None
    inputs: list[InputTensor]
    outputs: list[RequestedOutput] | None = None
    binary_output: bool = False
    timeout_s: float | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class OutputTensor:
    """One response output: a numeric array, or a list of strings for BYTES."""

    name: str
    datatype: str
    shape: list[int]
    values: np.ndarray | list[str]


def decode_request(body: bytes, header_length: str | None) -> InferenceRequest:
    """Parse a JSON or binary infer request body (400 ``InvalidRequest`` for anything malformed)."""
    header, binary = _split(body, header_length)
    try:
        document = orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the request header is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidRequest("the request must be a JSON object with an 'inputs' list")
    request_id = document.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidRequest("'id' must be a string")
    parameters = _object(document.get("parameters"), "'parameters'")
    inputs = document.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidRequest("'inputs' must be a non-empty list of tensors")
    offset = 0
    tensors = []
    for entry in inputs:
        tensor, size = _input(entry, binary, offset)
        tensors.append(tensor)
        offset += size
    if offset != len(binary):
        raise InvalidRequest(
            f"the binary section holds {len(binary)} bytes but the inputs' binary_data_size add up "
            f"to {offset}"
        )
    return InferenceRequest(
        id=request_id,
        inputs=tensors,
        outputs=_outputs(document.get("outputs")),
        binary_output=_flag(parameters, "binary_data_output", "request"),
        timeout_s=_timeout(parameters),
        parameters=parameters,
    )


def _split(body: bytes, header_length: str | None) -> tuple[bytes | memoryview, memoryview]:
    """The JSON header and the binary section, from ``Inference-Header-Content-Length``."""
    if not body:
        raise InvalidRequest("the body is empty: send an inference request")
    if header_length is None:
        return body, memoryview(b"")
    text = header_length.strip()
    if not DIGITS.match(text) or not 0 < int(text) <= len(body):
        raise InvalidRequest(
            f"{HEADER_LENGTH} must be the byte length of the JSON header, between 1 and the body's "
            f"{len(body)}"
            f" bytes; got {header_length[:32]!r}"
        )
    view = memoryview(body)
    return view[: int(text)], view[int(text) :]


def _object(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequest(f"{what} must be a JSON object")
    return value


def _flag(parameters: dict[str, Any], key: str, where: str) -> bool:
    value = parameters.get(key, False)
    if not isinstance(value, bool):
        raise InvalidRequest(f"{where} parameter {key!r} must be true or false")
    return value


def _timeout(parameters: dict[str, Any]) -> float | None:
    """Triton's ``parameters.timeout`` (microseconds) as seconds, or None."""
    value = parameters.get("timeout")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1_000 <= value <= 600_000_000:
        raise InvalidRequest(
            "parameter 'timeout' must be a whole number of microseconds in [1000, 600000000]"
        )
    return value / 1_000_000


def _input(entry: Any, binary: memoryview, offset: int) -> tuple[InputTensor, int]:
    """One input and how many bytes of the binary section it takes."""
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise InvalidRequest("every input must be an object with a string 'name'")
    name = entry["name"]
    datatype, shape = entry.get("datatype"), entry.get("shape")
    if datatype not in DATATYPES:
        raise InvalidRequest(
            f"input {name!r}: unknown datatype {datatype!r}; expected one of {', '.join(DATATYPES)}"
        )
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise InvalidRequest(
            f"input {name!r}: 'shape' must be a list of non-negative whole numbers"
        )
    parameters = _object(entry.get("parameters"), f"input {name!r}: 'parameters'")
    if any(key.startswith("shared_memory") for key in parameters):
        raise InvalidRequest(
            f"input {name!r}: shared memory is not supported; send the data inline or binary"
        )
    tensor = InputTensor(name, datatype, tuple(shape))
    size = parameters.get("binary_data_size")
    if size is None:
        if "data" not in entry:
            raise InvalidRequest(
                f"input {name!r} has neither 'data' nor a 'binary_data_size' parameter"
            )
        tensor.data = entry["data"]
        return tensor, 0
    if "data" in entry:
        raise InvalidRequest(f"input {name!r} has both 'data' and a 'binary_data_size' parameter")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise InvalidRequest(
            f"input {name!r}: 'binary_data_size' must be a non-negative whole number"
        )
    if offset + size > len(binary):
        raise InvalidRequest(
            f"input {name!r}: binary_data_size {size} runs past the end of the body (the binary "
            "section has"
            f" {len(binary)} bytes; check {HEADER_LENGTH})"
        )
    tensor.raw = binary[offset : offset + size]
    return tensor, size


def _outputs(value: Any) -> list[RequestedOutput] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise InvalidRequest("'outputs' must be a list of objects with a 'name'")
    outputs = []
    for entry in value:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise InvalidRequest("every output must be an object with a string 'name'")
        parameters = _object(entry.get("parameters"), f"output {entry['name']!r}: 'parameters'")
        if "classification" in parameters or any(
            key.startswith("shared_memory") for key in parameters
        ):
            raise InvalidRequest(
                f"output {entry['name']!r}: classification and shared memory are not supported"
            )
        binary = (
            _flag(parameters, "binary_data", f"output {entry['name']!r}")
            if "binary_data" in parameters
            else None
        )
        outputs.append(RequestedOutput(entry["name"], binary))
    return outputs


def input_array(tensor: InputTensor) -> np.ndarray:
    """The values of a fixed-size-datatype input as a numpy array of its declared shape (400 on
    mismatch)."""
    dtype = NUMPY_DTYPES[tensor.datatype]
    count = math.prod(tensor.shape)
    if tensor.raw is not None:
        if len(tensor.raw) != count * dtype.itemsize:
            raise InvalidRequest(
                f"input {tensor.name!r}: binary_data_size is {len(tensor.raw)} bytes but shape "
                f"{list(tensor.shape)}"
                f" of {tensor.datatype} needs {count * dtype.itemsize}"
            )
        return np.frombuffer(tensor.raw, dtype=dtype).reshape(tensor.shape)
    data = tensor.data
    if not isinstance(data, list | np.ndarray):  # JSON lists; gRPC's typed contents as arrays
        raise InvalidRequest(
            f"input {tensor.name!r}: 'data' must be a list of values (flat or nested, row-major)"
        )
    try:
        array = np.asarray(data)
    except (ValueError, TypeError):
        raise InvalidRequest(
            f"input {tensor.name!r}: 'data' is ragged: nested lists must be rectangular"
        ) from None
    if array.size and array.dtype.kind not in JSON_KINDS[dtype.kind]:
        kind = {"f": "numbers", "i": "integers", "u": "integers", "b": "booleans"}[dtype.kind]
        raise InvalidRequest(f"input {tensor.name!r}: {tensor.datatype} data must hold only {kind}")
    if array.size != count:
        raise InvalidRequest(
            f"input {tensor.name!r}: shape {list(tensor.shape)} holds {count} values but 'data' "
            f"has {array.size}"
        )
    if array.size and dtype.kind in "iu":
        limits = np.iinfo(dtype)
        if array.min() < limits.min or array.max() > limits.max:
            raise InvalidRequest(
                f"input {tensor.name!r}: values outside the {tensor.datatype} range"
            )
    return array.reshape(tensor.shape)


def encode_response(
    document: dict[str, Any], outputs: list[tuple[OutputTensor, bool]]
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when some outputs are binary (else None)."""
    entries, chunks = [], []
    for tensor, binary in outputs:
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": tensor.shape,
        }
        if binary:
            raw = tensor_bytes(tensor)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            values = tensor.values
            entry["data"] = values.reshape(-1) if isinstance(values, np.ndarray) else values
        entries.append(entry)
    header = json_bytes({**document, "outputs": entries})
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)


def tensor_bytes(tensor: OutputTensor) -> bytes:
    """An output's values in binary form: row-major little-endian, or BYTES elements one after
    another."""
    if isinstance(tensor.values, np.ndarray):
        dtype = NUMPY_DTYPES[tensor.datatype]
        return np.ascontiguousarray(tensor.values, dtype=dtype).tobytes()
    return b"".join(encode_bytes_element(value) for value in tensor.values)


@lru_cache(maxsize=4096)  # labels repeat: encode each once
def encode_bytes_element(value: str) -> bytes:
    """One BYTES element in binary form: 4-byte little-endian length, then the UTF-8 bytes."""
    data = value.encode()
    return struct.pack("<I", len(data)) + data
