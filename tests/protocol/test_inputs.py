"""Input decoding: JSON samples and images into validated float32 batches."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serving.errors import BadRequest, InvalidInput, PayloadTooLarge, ServingError
from serving.protocol.inputs import batch_from_data, batch_from_image
from serving.store.repository import ModelMetadata

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


META28 = ModelMetadata(name="m28", version=1, framework="onnx", path=Path("."), input_name="input",
                       input_shape=(28, 28), input_dtype="float32", input_range=(-1.0, 1.0),
                       output_name="probabilities", labels=[str(i) for i in range(10)], raw={})


def test_28x28_models_get_mnist_framing_in_their_input_range() -> None:
    page = np.full((300, 200), 255, dtype=np.uint8)
    page[40:200, 20:60] = 0  # a dark 160x40 bar, top left on a white page
    batch = batch_from_image(image_bytes(page), META28, max_pixels=100_000)
    assert batch.shape == (1, 28, 28) and batch.dtype == np.float32
    assert batch.min() == -1.0 and batch.max() == 1.0  # background at the low end, ink at the high end
    rows = np.flatnonzero((batch[0] > 0).any(axis=1))
    cols = np.flatnonzero((batch[0] > 0).any(axis=0))
    assert (len(rows), len(cols)) == (20, 5)  # the longer side fills MNIST's 20x20 box, the aspect is kept
    assert abs((rows[0] + rows[-1]) / 2 - 14) <= 1 and abs((cols[0] + cols[-1]) / 2 - 14) <= 1


@pytest.mark.parametrize("stroke", [(0, 0, 0, 255), (255, 255, 255, 255), (30, 90, 200, 255)])
def test_strokes_on_a_transparent_canvas_are_ink(stroke: tuple[int, int, int, int]) -> None:
    """Drawing apps export strokes on transparent pixels that hide black: the strokes must not vanish."""
    canvas = np.zeros((64, 64, 4), dtype=np.uint8)  # transparent black
    canvas[8:56, 28:36] = stroke
    buffer = io.BytesIO()
    Image.fromarray(canvas, mode="RGBA").save(buffer, format="PNG")
    batch = batch_from_image(buffer.getvalue(), META, max_pixels=10_000)
    assert batch[0, :, 3:5].min() >= 0.5 and batch[0, :, :3].max() == 0.0 and batch[0, :, 5:].max() == 0.0


def test_palette_image_with_a_transparent_index() -> None:
    image = Image.new("P", (40, 40), 0)
    image.putpalette([0, 0, 0, 0, 0, 0] + [0] * 762)  # index 0 and 1 both black; 0 is transparent
    image.info["transparency"] = 0
    for y in range(5, 35):
        for x in range(18, 22):
            image.putpixel((x, y), 1)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", transparency=0)
    batch = batch_from_image(buffer.getvalue(), META, max_pixels=10_000)
    assert batch[0, :, 3:5].min() >= 0.5 and batch[0, :, 0].max() == 0.0  # the bar, not the canvas


@pytest.mark.parametrize("size", [(1, 1), (1, 300), (300, 1), (3, 2)])
def test_degenerate_sizes_never_fail(size: tuple[int, int]) -> None:
    page = np.zeros(size, dtype=np.uint8)
    page[0, 0] = 255
    for meta in (META, META28):
        batch = batch_from_image(image_bytes(page), meta, max_pixels=10_000)
        assert batch.shape == (1, *meta.input_shape) and np.isfinite(batch).all()
        low, high = meta.input_range
        assert low <= batch.min() and batch.max() <= high


def test_a_blank_upload_is_an_empty_frame() -> None:
    for value in (0, 255):
        batch = batch_from_image(image_bytes(np.full((50, 50), value, dtype=np.uint8), "JPEG"), META28, 10_000)
        assert (batch == -1.0).all()


def test_a_picture_of_the_models_size_keeps_its_pixels() -> None:
    """A scikit-learn digit saved as an 8x8 PNG (what the API docs send) is the training sample itself."""
    from sklearn.datasets import load_digits

    images = [image for image in load_digits().images[:50] if image.max() == 16]  # most: full ink somewhere
    assert len(images) > 40
    for image in images:  # the contrast stretch maps the strongest ink to 1, as the dataset's 16 does
        for pixels in ((image * 15).astype(np.uint8), (255 - image * 15).astype(np.uint8)):  # either polarity
            batch = batch_from_image(image_bytes(pixels), META, max_pixels=10_000)
            np.testing.assert_allclose(batch[0], image / 16.0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits-tf", "digits-torch"])
def test_issue_11_the_first_t10k_digit_reads_7_on_the_8x8_models(model_repo: Path, name: str) -> None:
    """The report that opened issue 11: the first t10k digit (a 7) as a JPEG came back "4" at 0.97."""
    import onnxruntime as ort

    from serving.store.repository import ModelRepository
    from tests.mnist_support import t10k_digits

    images, labels = t10k_digits(1)
    assert int(labels[0]) == 7
    meta = ModelRepository(model_repo).resolve(name)
    session = ort.InferenceSession(str(meta.path / "model.onnx"), providers=["CPUExecutionProvider"])
    axis = 3 if meta.raw["input"]["layout"] == "NHWC" else 1
    for pixels in (np.rint(images[0] * 255).astype(np.uint8), np.rint(255 - images[0] * 255).astype(np.uint8)):
        batch = batch_from_image(image_bytes(pixels, "JPEG"), meta, max_pixels=10_000)
        (probabilities,) = session.run(["probabilities"], {"input": np.expand_dims(batch, axis)})
        assert int(probabilities.argmax()) == 7, probabilities
