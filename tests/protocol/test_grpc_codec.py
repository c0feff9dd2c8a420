"""The gRPC API's messages: generated from the checked-in .proto files, and the codec on its own."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from serving.errors import InvalidRequest
from serving.protocol.v2.codec import OutputTensor
from serving.protocol.v2.grpc_codec import decode_infer, encode_infer
from serving.protocol.v2.proto import grpc_service_pb2 as pb
from tests.conftest import ROOT


def test_the_generated_messages_match_the_proto_files() -> None:
    """make protos regenerates them; a .proto edited without it fails here."""
    result = subprocess.run([sys.executable, "scripts/generate_protos.py", "--check"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr


def test_tritons_messages_and_ours_live_side_by_side_and_agree_on_the_wire() -> None:
    """Our messages sit in a pool of their own, so a process may import tritonclient's too (same names)."""
    ours = pb.ModelInferRequest(model_name="m", id="7", raw_input_contents=[b"\x00" * 8])
    ours.inputs.add(name="input", datatype="FP32", shape=[2, 1])
    theirs = service_pb2.ModelInferRequest.FromString(ours.SerializeToString())
    assert (theirs.model_name, theirs.id, list(theirs.inputs[0].shape)) == ("m", "7", [2, 1])
    assert pb.ModelInferRequest.DESCRIPTOR.full_name == service_pb2.ModelInferRequest.DESCRIPTOR.full_name


def test_raw_and_typed_inputs_decode_to_the_same_values() -> None:
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    raw = pb.ModelInferRequest(raw_input_contents=[values.tobytes()])
    raw.inputs.add(name="x", datatype="FP32", shape=[2, 3])
    typed = pb.ModelInferRequest()
    typed.inputs.add(name="x", datatype="FP32", shape=[2, 3]).contents.fp32_contents.extend(values.ravel().tolist())
    from_raw, from_typed = decode_infer(raw), decode_infer(typed)
    assert from_raw.binary_output and not from_typed.binary_output
    assert np.frombuffer(from_raw.inputs[0].raw, dtype="<f4").tolist() == from_typed.inputs[0].data.tolist()


@pytest.mark.parametrize(("datatype", "field"), [("FP16", None), ("FP32", "int_contents")])
def test_typed_contents_must_be_the_datatypes_own(datatype: str, field: str | None) -> None:
    request = pb.ModelInferRequest()
    tensor = request.inputs.add(name="x", datatype=datatype, shape=[1])
    if field:
        getattr(tensor.contents, field).append(1)
    with pytest.raises(InvalidRequest, match="raw_input_contents only" if field is None else "has 0"):
        decode_infer(request)


def test_outputs_encode_raw_or_typed() -> None:
    probabilities = OutputTensor("p", "FP32", [1, 2], np.array([[0.25, 0.75]], dtype=np.float32))
    labels = OutputTensor("label", "BYTES", [1], ["7"])
    raw = encode_infer("m", "1", "id", [probabilities, labels], raw=True)
    assert raw.raw_output_contents == [np.float32([0.25, 0.75]).tobytes(), b"\x01\x00\x00\x007"]
    typed = encode_infer("m", "1", "id", [probabilities, labels], raw=False)
    assert list(typed.outputs[0].contents.fp32_contents) == [0.25, 0.75]
    assert list(typed.outputs[1].contents.bytes_contents) == [b"7"] and not typed.raw_output_contents
