"""Input decoding: JSON samples and images into validated float32 batches."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serving.errors import BadRequest, InvalidInput, PayloadTooLarge, ServingError
from serving.inputs import batch_from_data, batch_from_image
from serving.repository import ModelMetadata

META = ModelMetadata(name="m", version=1, framework="onnx", path=Path("."), input_name="input", input_shape=(8, 8),
                     input_dtype="float32", input_range=(0.0, 1.0), output_name="probabilities",
                     labels=[str(i) for i in range(10)], raw={})


@pytest.mark.parametrize(("data", "count"), [
    ([0.5] * 64, 1),
    ([[0.5] * 8] * 8, 1),
    ([[0.5] * 64] * 3, 3),
    ([[[0.5] * 8] * 8] * 2, 2),
    ([0] * 64, 1),
])
def test_accepted_shapes(data: list, count: int) -> None:
    batch = batch_from_data(data, META, max_batch=4)
    assert batch.shape == (count, 8, 8) and batch.dtype == np.float32 and batch.flags.c_contiguous


@pytest.mark.parametrize(("data", "message"), [
    ("pixels", "must be an array"),
    ({"a": 1}, "must be an array"),
    ([], "empty"),
    ([[]], "empty"),
    ([0.5] * 63, "shape"),
    ([[0.5] * 64, [0.5] * 63], "rectangular"),
    ([True] * 64, "only numbers"),
    (["0.5"] * 64, "only numbers"),
    ([None] * 64, "only numbers"),
    ([[0.5] * 64] * 5, "limit is 4"),
    ([1.5] + [0.5] * 63, r"\[0, 1\]"),
    ([float("nan")] + [0.5] * 63, "NaN"),
    ([float("inf")] + [0.5] * 63, "NaN or infinite"),
    ([1e308] * 64, r"\[0, 1\]"),
])
def test_rejected_data(data: object, message: str) -> None:
    with pytest.raises(InvalidInput, match=message) as info:
        batch_from_data(data, META, max_batch=4)
    assert info.value.status_code == 422


def image_bytes(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def test_image_is_grayscaled_inverted_and_resized() -> None:
    drawing = np.full((32, 32, 3), 255, dtype=np.uint8)  # white RGB page
    drawing[8:24, 12:20] = 0  # a dark vertical stroke: rows 2-5, columns 3-4 at 8x8
    for fmt in ("PNG", "JPEG"):
        batch = batch_from_image(image_bytes(drawing, fmt), META, max_pixels=10_000)
        assert batch.shape == (1, 8, 8) and 0.0 <= batch.min() and batch.max() <= 1.0
        assert batch[0, 3, 3:5].mean() > 0.8 and batch[0, 0, 0] < 0.1  # ink bright, background dark


def test_image_limits_and_garbage() -> None:
    with pytest.raises(PayloadTooLarge, match="pixels"):
        batch_from_image(image_bytes(np.zeros((200, 200), dtype=np.uint8)), META, max_pixels=10_000)
    for body in (b"", b"not an image", image_bytes(np.zeros((8, 8), dtype=np.uint8))[:30]):
        with pytest.raises(ServingError) as info:
            batch_from_image(body, META, max_pixels=10_000)
        assert isinstance(info.value, BadRequest)
