"""A TF Serving model folder (``<name>/<version>/saved_model.pb``) read without TensorFlow.

The gunicorn master must never import a framework, yet it checks every model before forking. A
SavedModel's ``serving_default`` signature (input and output names, dtypes, shapes) lives in the
``saved_model.pb`` protobuf, whose wire format is simple enough to walk here: SavedModel.meta_graphs
(2) -> MetaGraphDef.signature_def (5, a map) -> SignatureDef.inputs / outputs (1 / 2, maps of
TensorInfo: name 1, dtype 2, tensor_shape 3 -> dim 2 -> size 1). ``metadata_for`` turns that into
the
``metadata.json`` a folder without one would have: labels ``"0".."N-1"``, the input range [0, 1] for
float image inputs ([0, 255] for uint8; none for a feature vector), and no digests (the start-up log
says so; ``serving import`` records them).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from serving.errors import ModelLoadError

SIGNATURE = "serving_default"
# tensorflow.DataType: DT_FLOAT, DT_UINT8 (what a digit model takes)
DTYPES = {1: "float32", 4: "uint8"}
MAX_PB_BYTES = 512 * 1024 * 1024


def _varint(data: bytes, position: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if position >= len(data):
            raise ValueError("truncated varint")
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, position
        shift += 7
        if shift > 70:
            raise ValueError("varint too long")


def _fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) for each field of one protobuf message: ints for varints, bytes
    otherwise."""
    position = 0
    while position < len(data):
        key, position = _varint(data, position)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, position = _varint(data, position)
            yield number, value
        elif wire == 2:
            length, position = _varint(data, position)
            if position + length > len(data):
                raise ValueError("truncated field")
            yield number, data[position : position + length]
            position += length
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            yield number, data[position : position + width]
            position += width
        else:
            raise ValueError(f"unsupported wire type {wire}")


def _map(entries: list[bytes]) -> dict[str, bytes]:
    result = {}
    for entry in entries:
        fields = dict(_fields(entry))
        key, value = fields.get(1, b""), fields.get(2, b"")
        if isinstance(key, bytes) and isinstance(value, bytes):
            result[key.decode()] = value
    return result


def _tensor(info: bytes) -> tuple[str, list[int]]:
    """(dtype, shape with -1 for unknown dims) of a TensorInfo."""
    dtype, shape = "", []
    for number, value in _fields(info):
        if number == 2 and isinstance(value, int):
            dtype = DTYPES.get(value, f"DT_{value}")
        elif number == 3 and isinstance(value, bytes):
            for dim_number, dim in _fields(value):
                if dim_number == 2 and isinstance(dim, bytes):
                    size = dict(_fields(dim)).get(1, -1)
                    shape.append(
                        size - (1 << 64) if isinstance(size, int) and size >= 1 << 63 else int(size)
                    )  # type: ignore[arg-type]
    return dtype, shape


def read_signature(folder: Path) -> dict[str, Any]:
    """The ``serving_default`` signature: ``{"inputs": {name: (dtype, shape)}, "outputs":
    {...}}``."""
    pb = folder / "saved_model.pb"
    try:
        if pb.stat().st_size > MAX_PB_BYTES:
            raise ModelLoadError(f"{pb} is over {MAX_PB_BYTES >> 20} MiB")
        data = pb.read_bytes()
        meta_graphs = [
            value for number, value in _fields(data) if number == 2 and isinstance(value, bytes)
        ]
        if not meta_graphs:
            raise ValueError("no meta graph")
        signatures = _map(
            [v for n, v in _fields(meta_graphs[0]) if n == 5 and isinstance(v, bytes)]
        )
        if SIGNATURE not in signatures:
            raise ModelLoadError(
                f"{pb}: no {SIGNATURE!r} signature (it has: {', '.join(signatures) or 'none'})"
            )
        fields = list(_fields(signatures[SIGNATURE]))
        return {
            side: {
                name: _tensor(info)
                for name, info in _map(
                    [v for n, v in fields if n == number and isinstance(v, bytes)]
                ).items()
            }
            for side, number in (("inputs", 1), ("outputs", 2))
        }
    except OSError as exc:
        raise ModelLoadError(f"cannot read {pb}: {exc.strerror}") from None
    except ValueError as exc:
        raise ModelLoadError(f"{pb} is not a readable SavedModel ({exc})") from None


#: A flat input of N values is a feature vector unless N is the square of a side this long or
#: longer: then it is a flattened image (64 = 8x8 digits, 784 = 28x28 MNIST). ``serving import
#: --input`` says which when the guess is wrong.
MIN_FLAT_IMAGE_SIDE = 8


def input_layout(shape: list[int], kind: str = "auto") -> tuple[str, tuple[int, ...]]:
    """The layout and one sample's shape of an input shape with its batch dimension: an image
    [-1,H,W], [-1,H,W,1], [-1,1,H,W] or flat [-1,H*W] gives (H, W); a feature vector [-1,N] gives
    (N,). ``kind`` (image, features or auto) says what a flat input is; auto decides by
    ``MIN_FLAT_IMAGE_SIDE``."""
    dims = shape[1:]
    if len(dims) == 1 and dims[0] > 0:
        side = math.isqrt(dims[0])
        square = side * side == dims[0]
        if kind == "image" or (kind == "auto" and square and side >= MIN_FLAT_IMAGE_SIDE):
            if not square:
                raise ValueError(
                    f"input shape {shape} is not a flat square image: {dims[0]} values; say"
                    " --input features, or give --input-shape H,W of a model that takes images"
                )
            return "flat", (side, side)
        return "flat", (dims[0],)
    if kind == "features":
        raise ValueError(f"input shape {shape} is not a feature vector [-1, N]")
    if len(dims) == 2 and min(dims) > 0:
        return "NHW", (dims[0], dims[1])
    if len(dims) == 3 and dims[2] == 1 and min(dims) > 0:
        return "NHWC", (dims[0], dims[1])
    if len(dims) == 3 and dims[0] == 1 and min(dims) > 0:
        return "NCHW", (dims[1], dims[2])
    raise ValueError(
        f"input shape {shape} is neither one image ([-1, H, W], [-1, H, W, 1], [-1, 1, H, W],"
        " [-1, H*W]) nor a feature vector ([-1, N]) of known sizes"
    )


def metadata_for(folder: Path, name: str, version: int) -> dict[str, Any]:
    """What ``metadata.json`` would say for a TF Serving folder, from its signature alone."""
    signature = read_signature(folder)
    inputs, outputs = signature["inputs"], signature["outputs"]
    if len(inputs) != 1 or len(outputs) != 1:
        raise ModelLoadError(
            f"{folder}: the {SIGNATURE} signature has {len(inputs)} inputs and {len(outputs)}"
            " outputs; a classifier here takes one input and returns one score per class"
        )
    ((input_name, (dtype, shape)),) = inputs.items()
    ((output_name, (_, out_shape)),) = outputs.items()
    if dtype not in DTYPES.values():
        raise ModelLoadError(
            f"{folder}: input {input_name!r} is {dtype}; float32 or uint8 inputs are served"
        )
    try:
        layout, sample = input_layout(shape)
    except ValueError as exc:
        raise ModelLoadError(f"{folder}: {exc}") from None
    if len(out_shape) != 2 or out_shape[1] < 2:
        raise ModelLoadError(
            f"{folder}: output {output_name!r} has shape {out_shape}; expected [-1, classes]"
        )
    return {
        "name": name,
        "version": version,
        "framework": "tensorflow",
        "backend": "savedmodel",
        "source": "tf-serving folder (no metadata.json: no digests are checked)",
        "unverified": True,
        "input": {
            "kind": "image" if len(sample) == 2 else "features",
            "name": input_name,
            "shape": list(sample),
            "dtype": dtype,
            "layout": layout,
            "range": (
                None if len(sample) == 1 else ([0.0, 255.0] if dtype == "uint8" else [0.0, 1.0])
            ),
        },
        "output": {
            "name": output_name,
            "shape": [out_shape[1]],
            "dtype": "float32",
            "activation": "auto",
        },
        "labels": [str(i) for i in range(out_shape[1])],
    }
