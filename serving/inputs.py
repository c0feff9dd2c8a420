"""Turning request payloads into validated float32 batches ``(N, H, W)``.

The input contract (also served in ``/metadata``): ``data`` is one sample or a list of samples;
a sample is H*W pixel intensities, flat or nested H x W, as numbers in the model's input range
([0, 1] for the bundled models). Images (PNG, JPEG, ...) are converted to grayscale, inverted when
the background is light (the models were trained on light ink on a dark background), resized to
H x W and scaled to [0, 1]. Every violation raises a 4xx ``ServingError``; nothing here can 500.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np

from serving.errors import BadRequest, InvalidInput, PayloadTooLarge
from serving.repository import ModelMetadata

CONTRACT = (
    'JSON {"data": sample | [sample, ...]} where a sample is H*W numbers in the input range, flat or nested '
    "H x W; or an image body (image/png, image/jpeg) or multipart field 'file', converted to grayscale and resized"
)
IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/bmp", "image/webp", "image/tiff")


def batch_from_data(data: Any, meta: ModelMetadata, max_batch: int) -> np.ndarray:
    """Validate JSON ``data`` (one sample or a list of samples) into a float32 batch ``(N, H, W)``."""
    if not isinstance(data, list):
        raise InvalidInput('"data" must be an array of pixel values (one sample) or an array of samples')
    try:
        array = np.asarray(data)
    except (ValueError, TypeError):
        raise InvalidInput('"data" must be a rectangular array: every sample needs the same shape') from None
    if array.size == 0:
        raise InvalidInput("the batch is empty: send at least one sample")
    if array.dtype.kind not in "fiu":
        raise InvalidInput('"data" must hold only numbers (no strings, booleans, nulls or ragged rows)')
    height, width = meta.input_shape
    size = height * width
    shape = array.shape
    if shape == (size,) or shape == (height, width):
        batch = array.reshape(1, height, width)
    elif len(shape) in (2, 3) and shape[1:] in ((size,), (height, width)):
        batch = array.reshape(shape[0], height, width)
    else:
        raise InvalidInput(
            f'"data" has shape {list(shape)}; expected one sample of {size} values (flat or {height}x{width}) '
            f"or a list of such samples"
        )
    return check_batch(batch, meta, max_batch)


def check_batch(batch: np.ndarray, meta: ModelMetadata, max_batch: int) -> np.ndarray:
    """Enforce batch size, finiteness and the value range; returns a C-contiguous float32 array."""
    count = batch.shape[0]
    if count == 0:
        raise InvalidInput("the batch is empty: send at least one sample")
    if count > max_batch:
        raise InvalidInput(f"the batch has {count} samples; the limit is {max_batch} per request")
    low, high = meta.input_range
    # min/max are NaN when any value is NaN, so the negated comparison rejects NaN too.
    if not (batch.min() >= low and batch.max() <= high):
        if not np.isfinite(batch).all():
            raise InvalidInput("the input contains NaN or infinite values")
        raise InvalidInput(f"pixel values must lie in [{low:g}, {high:g}]")
    return np.ascontiguousarray(batch, dtype=np.float32)


def batch_from_image(body: bytes, meta: ModelMetadata, max_pixels: int) -> np.ndarray:
    """Decode one uploaded image into a ``(1, H, W)`` batch shaped for the model."""
    from PIL import Image, UnidentifiedImageError

    if not body:
        raise BadRequest("the image body is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(body))
            width, height = image.size
            if width * height > max_pixels:
                raise PayloadTooLarge(
                    f"the image is {width}x{height} pixels; the limit is {max_pixels} pixels (SERVING_MAX_IMAGE_PIXELS)"
                )
            gray = image.convert("L")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        if isinstance(exc, Image.DecompressionBombError | Image.DecompressionBombWarning):
            raise PayloadTooLarge("the image decompresses to too many pixels") from None
        raise BadRequest("the body is not a readable image (PNG, JPEG, GIF, BMP, WebP or TIFF)") from None
    target_h, target_w = meta.input_shape
    pixels = np.asarray(gray, dtype=np.float32) / 255.0
    if pixels.mean() > 0.5:  # dark ink on a light background: flip to the training convention
        pixels = 1.0 - pixels
    shrinking = min(width, height) >= max(target_h, target_w)
    resample = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
    resized = Image.fromarray((pixels * 255.0).astype(np.uint8)).resize((target_w, target_h), resample)
    low, high = meta.input_range
    scaled = np.asarray(resized, dtype=np.float32) / 255.0 * (high - low) + low
    return scaled.reshape(1, target_h, target_w)
