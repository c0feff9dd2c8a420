"""The v2 wire format on its own: JSON and binary requests, every malformed case, binary responses."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import orjson
import pytest
import tritonclient.http as triton
from tritonclient.http import _utils as triton_utils

from serving.errors import InvalidRequest
from serving.protocol.v2.codec import OutputTensor, decode_request, encode_response, input_array


def tensor(data: Any = None, shape: list[int] | None = None, datatype: str = "FP32", **extra: Any) -> dict[str, Any]:
    entry = {"name": "input", "shape": shape or [1, 64], "datatype": datatype, **extra}
    if data is not None:
        entry["data"] = data
    return entry


def binary_body(arrays: list[np.ndarray], datatype: str = "FP32", **request: Any) -> tuple[bytes, str]:
    inputs = [tensor(shape=list(a.shape), datatype=datatype, parameters={"binary_data_size": a.nbytes})
              for a in arrays]
    header = orjson.dumps({"inputs": inputs, **request})
    return header + b"".join(a.tobytes() for a in arrays), str(len(header))


def decode_one(body: bytes, header: str | None = None) -> np.ndarray:
    return input_array(decode_request(body, header).inputs[0])


def test_json_request_flat_or_nested() -> None:
    values = np.arange(64, dtype=np.float32) / 64
    flat = decode_one(orjson.dumps({"id": "7", "inputs": [tensor(values.tolist())]}))
    nested = decode_one(orjson.dumps({"inputs": [tensor(values.reshape(8, 8).tolist(), shape=[1, 8, 8])]}))
    assert flat.shape == (1, 64) and nested.shape == (1, 8, 8)
    np.testing.assert_array_equal(flat.reshape(-1), nested.reshape(-1))
    request = decode_request(orjson.dumps({"id": "7", "inputs": [tensor(values.tolist())],
                                           "outputs": [{"name": "label", "parameters": {"binary_data": True}}],
                                           "parameters": {"timeout": 250_000}}), None)
    assert request.id == "7" and request.outputs is not None and request.outputs[0].binary is True
    assert request.timeout_s == 0.25 and request.binary_output is False


def test_binary_request_is_a_view_of_the_body() -> None:
    array = np.random.default_rng(0).random((3, 8, 8), dtype=np.float32)
    body, header = binary_body([array], parameters={"binary_data_output": True})
    decoded = decode_request(body, header)
    assert decoded.binary_output is True
    np.testing.assert_array_equal(input_array(decoded.inputs[0]), array)


def test_the_body_tritonclient_builds_decodes() -> None:
    array = np.random.default_rng(1).random((2, 8, 8), dtype=np.float32)
    for binary in (True, False):
        infer_input = triton.InferInput("input", list(array.shape), "FP32")
        infer_input.set_data_from_numpy(array, binary_data=binary)
        outputs = [triton.InferRequestedOutput("probabilities", binary_data=binary)]
        body, json_size = triton_utils._get_inference_request([infer_input], "r1", outputs, 0, False, False, 0,
                                                              None, None)
        decoded = decode_request(body, None if json_size is None else str(json_size))
        np.testing.assert_array_equal(input_array(decoded.inputs[0]), array)
        assert decoded.id == "r1" and decoded.outputs is not None and decoded.outputs[0].binary is binary


@pytest.mark.parametrize(("datatype", "values", "dtype"), [
    ("FP64", [0.5] * 64, np.float64), ("INT32", [1] * 64, np.int32), ("UINT8", [0] * 64, np.uint8),
    ("FP16", [0.25] * 64, np.float16), ("INT64", [0] * 64, np.int64),
])
def test_other_datatypes_decode_to_their_dtype(datatype: str, values: list[Any], dtype: Any) -> None:
    json_array = decode_one(orjson.dumps({"inputs": [tensor(values, datatype=datatype)]}))
    body, header = binary_body([np.asarray(values, dtype=dtype).reshape(1, 64)], datatype=datatype)
    binary_array = decode_one(body, header)
    assert binary_array.dtype == dtype and json_array.shape == binary_array.shape == (1, 64)
    np.testing.assert_array_equal(json_array.astype(dtype), binary_array)


BAD_JSON = [
    (b"", "the body is empty"),
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (orjson.dumps({"inputs": []}), "non-empty list"),
    (orjson.dumps({"inputs": [tensor([0.0] * 64)], "id": 5}), "'id' must be a string"),
    (orjson.dumps({"inputs": [{"shape": [1], "datatype": "FP32", "data": [1]}]}), "string 'name'"),
    (orjson.dumps({"inputs": [tensor([0.0] * 64, datatype="FLOAT")]}), "unknown datatype 'FLOAT'"),
    (orjson.dumps({"inputs": [tensor([0.0] * 64, shape=[1, -64])]}), "non-negative whole numbers"),
    (orjson.dumps({"inputs": [tensor([0.0] * 64, shape="1x64")]}), "non-negative whole numbers"),
    (orjson.dumps({"inputs": [tensor()]}), "neither 'data' nor"),
    (orjson.dumps({"inputs": [tensor([0.0] * 64, parameters={"binary_data_size": 256})]}), "both 'data'"),
    (orjson.dumps({"inputs": [tensor([0.0] * 64, parameters={"shared_memory_region": "r"})]}), "shared memory"),
    (orjson.dumps({"inputs": [tensor([0.0] * 64)], "parameters": {"binary_data_output": "yes"}}), "true or false"),
    (orjson.dumps({"inputs": [tensor([0.0] * 64)], "parameters": {"timeout": -1}}), "microseconds"),
    (orjson.dumps({"inputs": [tensor([0.0] * 64)], "outputs": "label"}), "'outputs' must be a list"),
    (orjson.dumps({"inputs": [tensor([0.0] * 64)], "outputs": [{"name": "label", "parameters": {
        "classification": 3}}]}), "classification"),
    (orjson.dumps({"inputs": [tensor([0.0] * 64)], "parameters": []}), "'parameters' must be a JSON object"),
]


@pytest.mark.parametrize(("body", "message"), BAD_JSON, ids=[m for _, m in BAD_JSON])
def test_malformed_requests_are_400_naming_the_problem(body: bytes, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message) as error:
        decode_request(body, None)
    assert error.value.status_code == 400


BAD_VALUES = [
    (tensor([0.0] * 63), "holds 64 values but 'data' has 63"),
    (tensor([[0.0] * 64, [0.0]]), "ragged"),
    (tensor(["a"] * 64), "FP32 data must hold only numbers"),
    (tensor([True] * 64), "FP32 data must hold only numbers"),
    (tensor([None] * 64), "FP32 data must hold only numbers"),
    (tensor([0.5] * 64, datatype="INT32"), "INT32 data must hold only integers"),
    (tensor([300] * 64, datatype="UINT8"), "outside the UINT8 range"),
    (tensor(0.5), "'data' must be a list"),
]


@pytest.mark.parametrize(("entry", "message"), BAD_VALUES, ids=[m for _, m in BAD_VALUES])
def test_values_that_disagree_with_the_declaration_are_400(entry: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        decode_one(orjson.dumps({"inputs": [entry]}))


def test_binary_framing_errors() -> None:
    array = np.zeros((1, 64), dtype=np.float32)
    body, header = binary_body([array])
    for wrong in ("0", str(len(body) + 1), "ten", "-5", "\u00b2"):
        with pytest.raises(InvalidRequest, match="Inference-Header-Content-Length"):
            decode_request(body, wrong)
    for off in (4, -1):  # a wrong length cuts the JSON short or swallows binary data into it
        with pytest.raises(InvalidRequest, match="not valid JSON"):
            decode_request(body, str(int(header) + off))
    with pytest.raises(InvalidRequest, match="binary section holds 260 bytes but"):
        decode_request(body + b"\0\0\0\0", header)
    with pytest.raises(InvalidRequest, match="runs past the end of the body"):
        decode_request(body[:-4], header)
    with pytest.raises(InvalidRequest, match="runs past the end of the body"):  # binary sizes, no header
        decode_request(body[:int(header)], None)
    half, half_header = binary_body([np.zeros((1, 32), dtype=np.float32)])
    wrong_size = orjson.loads(half[:int(half_header)])
    wrong_size["inputs"][0]["shape"] = [1, 64]
    header_bytes = orjson.dumps(wrong_size)
    with pytest.raises(InvalidRequest, match="binary_data_size is 128 bytes but shape"):
        decode_one(header_bytes + half[int(half_header):], str(len(header_bytes)))


def test_binary_response_is_what_tritonclient_reads() -> None:
    probabilities = np.random.default_rng(2).random((3, 10), dtype=np.float32)
    labels = ["7", "1", "ten"]
    outputs = [(OutputTensor("probabilities", "FP32", [3, 10], probabilities), True),
               (OutputTensor("label", "BYTES", [3], labels), True)]
    body, header_length = encode_response({"model_name": "m", "model_version": "1", "id": "x"}, outputs)
    assert header_length is not None
    result = triton.InferResult.from_response_body(body, header_length=header_length)
    np.testing.assert_array_equal(result.as_numpy("probabilities"), probabilities)
    assert [v.decode() for v in result.as_numpy("label")] == labels
    assert body[header_length + 120:header_length + 125] == struct.pack("<I", 1) + b"7"

    mixed = [(outputs[0][0], False), (outputs[1][0], True)]
    body, header_length = encode_response({"model_name": "m", "id": "x"}, mixed)
    result = triton.InferResult.from_response_body(body, header_length=header_length)
    np.testing.assert_array_equal(result.as_numpy("probabilities"), probabilities)
    json_only, none = encode_response({"model_name": "m", "id": "x"}, [(outputs[0][0], False)])
    assert none is None  # float32 values survive the JSON round trip exactly (shortest repr)
    np.testing.assert_array_equal(np.float32(orjson.loads(json_only)["outputs"][0]["data"]), probabilities.ravel())
