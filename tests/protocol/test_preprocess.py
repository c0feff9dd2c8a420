"""Uploaded digits framed like the training data: LeCun's 28x28 procedure and optdigits' 4x4 block counts."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import serving.protocol.preprocess
from serving.protocol.preprocess import (
    INK_THRESHOLD,
    MNIST_BOX,
    NOISE_FLOOR,
    block_count_frame,
    crop_to_ink,
    ink_map,
    mnist_frame,
    model_input,
    stroke_width,
    thicken,
)
from tests.mnist_support import t10k_digits


def bbox(frame: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right), inclusive, of the non-zero pixels."""
    rows, cols = np.flatnonzero(frame.any(axis=1)), np.flatnonzero(frame.any(axis=0))
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


def centre_of_mass(frame: np.ndarray) -> tuple[float, float]:
    rows, cols = np.indices(frame.shape)
    return float((rows * frame).sum() / frame.sum()), float((cols * frame).sum() / frame.sum())


def test_ink_map_inverts_light_pages_and_stretches_contrast() -> None:
    page = np.full((40, 30), 200, dtype=np.uint8)  # grey paper
    page[10:30, 12:16] = 60  # pencil stroke
    ink = ink_map(page)
    assert ink.dtype == np.float32
    assert ink[0, 0] == 0.0 and ink[20, 14] == pytest.approx(1.0)
    dark = 255 - page  # the same picture light-on-dark is not inverted, and reads the same
    np.testing.assert_allclose(ink_map(dark), ink, atol=1e-6)


def test_ink_map_of_a_blank_or_flat_page_is_empty() -> None:
    for value in (0, 128, 255):
        assert not ink_map(np.full((20, 20), value, dtype=np.uint8)).any()
    faint = np.full((20, 20), 250, dtype=np.uint8)
    faint[5:15, 9:11] = 240  # a 4% dent: paper grain, not a digit
    assert not ink_map(faint).any()


def test_noise_below_the_threshold_is_not_ink() -> None:
    rng = np.random.default_rng(0)
    ink = (rng.random((60, 60)) * INK_THRESHOLD * 0.99).astype(np.float32)  # speckle everywhere, under the bar
    ink[20:41, 25:31] = 0.9  # the digit
    crop = crop_to_ink(ink)
    assert crop is not None and crop.shape == (21, 6)
    ink[5, 5] = INK_THRESHOLD * 1.01  # one speck above it widens the box ...
    crop = crop_to_ink(ink)
    assert crop is not None and crop.shape == (36, 26)
    assert not ((crop > 0) & (crop <= NOISE_FLOOR)).any()  # ... and the faintest noise inside it is cleared
    assert crop_to_ink(np.zeros((5, 5), np.float32)) is None


@pytest.mark.parametrize(("shape", "box"), [((80, 20), (20, 5)), ((12, 60), (4, 20)), ((5, 5), (20, 20))])
def test_mnist_frame_fits_the_longer_side_to_20_keeping_the_aspect(shape: tuple[int, int],
                                                                  box: tuple[int, int]) -> None:
    page = np.zeros((200, 200), dtype=np.uint8)
    page[37 : 37 + shape[0], 120 : 120 + shape[1]] = 255  # far off centre
    frame = mnist_frame(ink_map(page))
    assert frame.shape == (28, 28) and 0.0 <= frame.min() and frame.max() <= 1.0
    top, bottom, left, right = bbox(frame > 0.5)
    assert (bottom - top + 1, right - left + 1) == box
    assert max(box) == MNIST_BOX
    com = centre_of_mass(frame)
    assert abs(com[0] - 14.0) <= 0.5 and abs(com[1] - 14.0) <= 0.5  # MNIST: integer shift to (14, 14)


def test_mnist_frame_centres_by_mass_not_by_box() -> None:
    page = np.zeros((40, 40), dtype=np.uint8)
    page[5:35, 5:8] = 255  # a heavy left bar ...
    page[5:8, 5:35] = 255  # ... and a light top bar: an "L" on its head, its mass on the left
    frame = mnist_frame(ink_map(page))
    top, bottom, left, right = bbox(frame > 0.5)
    assert (left + right) / 2 > 14.5  # the box sits right of centre so that the mass can sit on it
    assert abs(centre_of_mass(frame)[1] - 14.0) <= 0.5


def test_real_digits_uploaded_come_back_as_mnist_made_them() -> None:
    """t10k digits, scaled 3x, padded off centre, dark-on-light, as JPEG: framed again, they match the originals."""
    images, _ = t10k_digits(100)
    correlations = []
    for index, image in enumerate(images):
        digit = Image.fromarray(np.rint(image * 255).astype(np.uint8)).resize((84, 84), Image.Resampling.BICUBIC)
        page = np.zeros((84 + 30, 84 + 50), dtype=np.uint8)
        page[index % 30 : index % 30 + 84, 10 : 94] = np.asarray(digit)
        buffer = io.BytesIO()
        Image.fromarray(255 - page).convert("RGB").save(buffer, format="JPEG", quality=75)
        gray = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("L"))
        framed = model_input(gray, (28, 28))
        correlations.append(np.corrcoef(framed.ravel(), image.ravel())[0, 1])
    assert np.median(correlations) > 0.97 and np.mean(np.asarray(correlations) > 0.9) >= 0.8, correlations


def test_block_counts_are_exact() -> None:
    square = np.zeros((50, 50), dtype=np.uint8)
    square[10:40, 10:40] = 255  # a thick shape: no stroke growth, it fills the 32x32 bitmap
    np.testing.assert_array_equal(block_count_frame(ink_map(square), 8, 8), np.ones((8, 8)))
    tall = np.zeros((100, 60), dtype=np.uint8)
    tall[10:90, 10:50] = 255  # 2:1 -> 32x16 at columns 8..23 of the bitmap: blocks 2-5 full
    expected = np.zeros((8, 8))
    expected[:, 2:6] = 1.0
    np.testing.assert_array_equal(block_count_frame(ink_map(tall), 8, 8), expected)


def test_thin_strokes_grow_thick_ones_do_not(monkeypatch: pytest.MonkeyPatch) -> None:
    thin = np.zeros((120, 120), dtype=np.uint8)
    thin[10:110, 58:61] = 255  # a "T" of 3 px strokes in a 100 px box: about 1 px in the 32 px bitmap
    thin[10:13, 30:90] = 255
    thick = np.zeros((120, 120), dtype=np.uint8)
    thick[10:110, 50:70] = 255  # the same "T" in 20 px strokes: about 6 px
    thick[10:30, 30:90] = 255
    grown = {name: block_count_frame(ink_map(page), 8, 8) for name, page in (("thin", thin), ("thick", thick))}
    monkeypatch.setattr(serving.protocol.preprocess, "THIN_STROKE", 0.0)  # nothing counts as thin: nothing grows
    as_drawn = {name: block_count_frame(ink_map(page), 8, 8) for name, page in (("thin", thin), ("thick", thick))}
    assert grown["thin"].sum() > 1.5 * as_drawn["thin"].sum()
    np.testing.assert_array_equal(grown["thick"], as_drawn["thick"])


def test_stroke_width() -> None:
    bar = np.zeros((10, 40), dtype=bool)
    bar[3:6, 5:35] = True  # 3 wide, 30 long
    assert 2.5 <= stroke_width(bar) <= 3.5
    square = np.zeros((20, 20), dtype=bool)
    square[5:15, 5:15] = True
    assert stroke_width(square) > 5
    assert stroke_width(np.zeros((5, 5), dtype=bool)) == 0.0


def test_block_counts_for_other_shapes_and_blank_pages() -> None:
    page = np.zeros((30, 30), dtype=np.uint8)
    page[5:25, 12:18] = 255
    assert model_input(page, (16, 12)).shape == (16, 12)
    values = model_input(page, (8, 8))
    assert values.shape == (8, 8) and values.dtype == np.float32 and 0.0 <= values.min() and values.max() <= 1.0
    assert not model_input(np.zeros((30, 30), np.uint8), (8, 8)).any()
    assert not model_input(np.full((30, 30), 255, np.uint8), (28, 28)).any()


def test_thicken_grows_every_way_without_clipping() -> None:
    values = np.zeros((3, 4), dtype=np.float32)
    values[0, 3] = 0.5
    grown = thicken(values, 1)
    assert grown.shape == (5, 6) and grown.dtype == np.float32
    np.testing.assert_array_equal(np.argwhere(grown), [[r, c] for r in range(3) for c in range(3, 6)])
    assert grown.max() == 0.5
    np.testing.assert_array_equal(thicken(values, 0), values)


def test_mnist_images_of_28x28_come_back_unchanged() -> None:
    images, _ = t10k_digits(20)
    for image in images:
        pixels = np.rint(image * 255).astype(np.uint8)
        expected = pixels / 255.0 / (pixels.max() / 255.0)  # the contrast stretch: strongest ink at 1
        np.testing.assert_allclose(model_input(pixels, (28, 28)), expected, atol=1e-6)
