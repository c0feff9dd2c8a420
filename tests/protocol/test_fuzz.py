"""Fuzzing the three parsers that take raw client bytes: the image decoder, the native JSON parser, the v2 codec.

Each target may only answer or raise a ``ServingError`` (a 4xx, or the decoder's 503/504): any other exception
would be a 500. Inputs start from the seed corpus in ``tests/data/fuzz/`` (one valid file per format and
protocol) and are mutated by Hypothesis (bytes flipped, inserted, cut, repeated, concatenated; Hypothesis
shrinks a failure to its smallest form and keeps it in its example database). ``make test`` runs a short
pass; ``make fuzz`` runs each target for ``FUZZ_EXAMPLES`` examples (default 20,000).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.errors import ServingError
from serving.http.encoding import parse_json_object
from serving.protocol.inputs import batch_from_data, batch_from_image
from serving.protocol.v2.codec import decode_request, input_array
from serving.store.repository import ModelMetadata

CORPUS = Path(__file__).resolve().parents[1] / "data" / "fuzz"
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
META = ModelMetadata(name="fuzz", version=1, framework="onnx", path=CORPUS, input_name="input",
                     input_shape=(28, 28), input_dtype="float32", input_range=(0.0, 1.0),
                     output_name="probabilities", labels=[str(i) for i in range(10)], raw={})


def seeds(*suffixes: str) -> list[bytes]:
    return [path.read_bytes() for path in sorted(CORPUS.iterdir()) if path.suffix in suffixes]


@st.composite
def mutated(draw: st.DrawFn, corpus: list[bytes]) -> bytes:
    """A seed with a few random edits: flips, insertions, deletions, repeats, a cut, or a second seed."""
    data = bytearray(draw(st.sampled_from(corpus)))
    for _ in range(draw(st.integers(0, 6))):
        edit = draw(st.sampled_from(["flip", "insert", "delete", "repeat", "cut", "splice"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if edit == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif edit == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif edit == "delete":
            del data[at:at + draw(st.integers(1, 32))]
        elif edit == "repeat":
            data[at:at] = data[at:at + draw(st.integers(1, 64))] * draw(st.integers(1, 50))
        elif edit == "cut":
            del data[at:]
        else:
            data += draw(st.sampled_from(corpus))
    return bytes(data)


def only_serving_errors(call, *args) -> None:  # type: ignore[no-untyped-def]
    try:
        call(*args)
    except ServingError:
        pass


@FUZZ
@given(body=mutated(seeds(".png", ".jpg", ".gif", ".bmp", ".webp", ".tiff")) | st.binary(max_size=512))
def test_the_image_decoder_answers_or_refuses(body: bytes) -> None:
    only_serving_errors(batch_from_image, body, META, 4_000_000, None)


@FUZZ
@given(body=mutated(seeds(".json")) | st.binary(max_size=256))
def test_the_native_json_parser_answers_or_refuses(body: bytes) -> None:
    def parse(raw: bytes) -> None:
        payload = parse_json_object(raw)
        if "data" in payload:
            batch_from_data(payload["data"], META, 64, None)

    only_serving_errors(parse, body)


@FUZZ
@given(body=mutated(seeds(".bin", ".json")), header_length=st.one_of(
    st.none(), st.just((CORPUS / "v2-binary.length").read_text()), st.integers(-5, 600).map(str),
    st.text(max_size=6)))
def test_the_v2_codec_answers_or_refuses(body: bytes, header_length: str | None) -> None:
    def decode(raw: bytes, length: str | None) -> None:
        request = decode_request(raw, length)
        for tensor in request.inputs:
            if tensor.datatype != "BYTES":
                np.asarray(input_array(tensor))

    only_serving_errors(decode, body, header_length)


@pytest.mark.parametrize("name", sorted(path.name for path in CORPUS.iterdir()
                                        if path.suffix in (".png", ".jpg", ".gif", ".bmp", ".webp", ".tiff")))
def test_every_image_seed_decodes(name: str) -> None:
    """The corpus is valid: a fuzzer that starts from broken seeds explores only the first check."""
    assert batch_from_image((CORPUS / name).read_bytes(), META, 4_000_000, None).shape == (1, 28, 28)
