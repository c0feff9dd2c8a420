"""Turning request payloads into validated float32 batches: ``(N, H, W)`` images or ``(N, F)``
feature rows.

The input contract (also served in ``/metadata``) is the tensor the model declares. ``data`` is
one sample or a list of samples. For an image model a sample is H*W pixel intensities, flat or
nested H x W, as numbers in the model's input range ([0, 1] for the bundled models); images (PNG,
JPEG, ...) of one digit are made into the model's input the way its training data were made
(``serving.protocol.preprocess``: MNIST's 20x20 box centred by mass in 28x28, or optdigits' 4x4
block counts for other sizes) and scaled to the input range. For a feature model a sample is a row
of its N feature values, in the order its metadata names them; they must be finite, and lie in the
input range only when the model declares one (the range each feature had in training is described,
not enforced). Every violation raises a 4xx ``ServingError``; nothing here can 500.
"""

from __future__ import annotations

import io
import threading
import time
import warnings
from typing import Any

import numpy as np

from serving.errors import (
    BadRequest,
    DeadlineExceeded,
    InvalidInput,
    PayloadTooLarge,
    QueueFull,
    UnsupportedMediaType,
)
from serving.protocol.preprocess import model_input
from serving.store.repository import ModelMetadata

CONTRACT = (
    'JSON {"data": sample | [sample, ...]} where a sample is H*W numbers in the input range, flat'
    ' or nested H x W (or in "pixel_range": [0, 255] for 8-bit pixels); or an image body'
    " (image/png, image/jpeg) or multipart field 'file', converted to grayscale and framed like the"
    " training data"
)
FEATURES_CONTRACT = (
    'JSON {"data": row | [row, ...]} where a row is the model\'s N feature values, in the order'
    " input.features names them, as finite numbers"
)
IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/bmp", "image/webp", "image/tiff")
#: The decoders an upload may reach: the advertised formats only (Pillow knows ~40, some of them
#: fragile).
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")
#: PNG text chunks are inflated while the header is read, before any pixel check: cap them hard.
MAX_TEXT_CHUNK, MAX_TEXT_MEMORY = 64 * 1024, 256 * 1024
#: Decoded bytes a pixel of each mode takes (unknown modes count 8: refused at the 4-byte cap).
BYTES_PER_PIXEL = {
    "1": 1,
    "L": 1,
    "P": 1,
    "LA": 2,
    "PA": 2,
    "La": 2,
    "I;16": 2,
    "I;16B": 2,
    "I;16L": 2,
    "I;16N": 2,
    "RGB": 3,
    "YCbCr": 3,
    "LAB": 3,
    "HSV": 3,
    "RGBA": 4,
    "RGBa": 4,
    "RGBX": 4,
    "CMYK": 4,
    "I": 4,
    "F": 4,
}
#: A progressive JPEG refines its pixels over scans; ordinary encoders write about 10. A crafted
#: file repeating one scan thousands of times costs seconds of decoding in a few kilobytes.
MAX_JPEG_SCANS = 64
#: Image decodes one worker runs at once: each holds a buffer of up to 4 x SERVING_MAX_IMAGE_PIXELS.
DECODE_SLOTS = threading.BoundedSemaphore(2)
#: Pictures are reduced (before conversion) to about this many times the model's input size.
REDUCE_TO = 8
FLOAT32_MAX = float(np.finfo(np.float32).max)
#: 8-bit pixel intensities: the ``pixel_range`` of /inference, of v2 UINT8 tensors, and of ``[0,
#: 255]``.
PIXELS_8BIT = (0.0, 255.0)


def batch_from_data(
    data: Any, meta: ModelMetadata, max_batch: int, pixel_range: tuple[float, float] | None = None
) -> np.ndarray:
    """Validate JSON ``data`` (one sample or a list of samples) into a float32 batch ``(N, H, W)``.

    Values are in the model's input range, or in ``pixel_range`` (e.g. ``PIXELS_8BIT``, 0-255),
    which is converted exactly to it. Lengths are checked before ``np.asarray``, so a body of a
    million empty lists costs a few microseconds, not a second and 70 MB.
    """
    if not isinstance(data, list):
        what = "pixel values" if meta.is_image else "feature values"
        raise InvalidInput(f'"data" must be an array of {what} (one sample) or an array of samples')
    if meta.input_kind != "image":
        if pixel_range is not None:
            raise InvalidInput(
                f'"pixel_range" is for image models; model {meta.name} takes'
                f" {meta.describe_input()}: send their values as they are"
            )
        return _feature_rows(data, meta, max_batch)
    height, width = meta.input_shape
    size = height * width
    if len(data) > max(size, max_batch) or (
        data and isinstance(data[0], list) and len(data[0]) > size
    ):
        raise InvalidInput(
            f'"data" is longer than {max(size, max_batch)} values or samples: send at most'
            f" {max_batch} samples of {size} values"
        )
    array = _numbers(data)
    shape = array.shape
    if shape == (size,) or shape == (height, width):
        batch = array.reshape(1, height, width)
    elif len(shape) in (2, 3) and shape[1:] in ((size,), (height, width)):
        batch = array.reshape(shape[0], height, width)
    else:
        raise InvalidInput(
            f'"data" has shape {list(shape)}; expected one sample of {size} values'
            f" (flat or {height}x{width}) "
            f"or a list of such samples"
        )
    if pixel_range is not None:
        batch = rescale(batch, pixel_range, meta.input_range)
    return check_batch(batch, meta, max_batch)


def _feature_rows(data: list[Any], meta: ModelMetadata, max_batch: int) -> np.ndarray:
    """A ``(N, F)`` batch from one row of F values or a list of rows (lengths checked first)."""
    size = meta.sample_size
    if not data:
        raise InvalidInput("the batch is empty: send at least one sample")
    rows = isinstance(data[0], list)
    if rows and len(data) > max_batch:
        raise InvalidInput(f"the batch has {len(data)} rows; the limit is {max_batch} per request")
    if len(data[0] if rows else data) != size:
        shape = [len(data), len(data[0])] if rows else [len(data)]
        raise InvalidInput(
            f'"data" has shape {shape}; model {meta.name} takes rows of'
            f" {meta.describe_input()}: one row [{size} values] or a list of rows"
        )
    array = _numbers(data)
    if array.shape == (size,):
        batch = array.reshape(1, size)
    elif array.ndim == 2 and array.shape[1] == size:
        batch = array
    else:
        raise InvalidInput(
            f'"data" has shape {list(array.shape)}; model {meta.name} takes rows of'
            f" {meta.describe_input()}: one row [{size} values] or a list of rows"
        )
    return check_batch(batch, meta, max_batch)


def _numbers(data: list[Any]) -> np.ndarray:
    """``data`` as a numeric array: 422 when ragged, empty, or holding anything but numbers."""
    try:
        array = np.asarray(data)
    except (ValueError, TypeError):
        raise InvalidInput(
            '"data" must be a rectangular array: every sample needs the same shape'
        ) from None
    if array.size == 0:
        raise InvalidInput("the batch is empty: send at least one sample")
    if array.dtype.kind not in "fiu":
        raise InvalidInput(
            '"data" must hold only numbers (no strings, booleans, nulls or ragged rows)'
        )
    return array


def rescale(
    batch: np.ndarray, source: tuple[float, float], target: tuple[float, float]
) -> np.ndarray:
    """Map values in ``source`` (e.g. 0-255 pixels) linearly onto ``target`` (the model's input
    range).

    Values outside ``source`` are refused (422) rather than clipped: a client that sends 300 in
    8-bit pixels has a bug to know about. Computed in float64, so 0-255 maps to the float32 nearest
    i/255.
    """
    low, high = source
    if not (batch.min() >= low and batch.max() <= high):
        if not np.isfinite(batch).all():
            raise InvalidInput("the input contains NaN or infinite values")
        raise InvalidInput(f"pixel values must lie in [{low:g}, {high:g}] (the pixel_range sent)")
    target_low, target_high = target
    scaled = (batch.astype(np.float64) - low) * (
        (target_high - target_low) / (high - low)
    ) + target_low
    return np.clip(scaled, target_low, target_high).astype(np.float32)


def pixel_range_of(value: Any) -> tuple[float, float] | None:
    """The native API's optional ``"pixel_range": [low, high]`` field, validated (422 when
    malformed)."""
    if value is None:
        return None
    if (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        and value[0] < value[1]
        and all(np.isfinite(value))
    ):
        return float(value[0]), float(value[1])
    raise InvalidInput(
        '"pixel_range" must be two numbers [low, high] with low < high, e.g. [0, 255]'
    )


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
        what = "pixel values" if meta.is_image else "input values"
        raise InvalidInput(f"{what} must lie in [{low:g}, {high:g}]")
    # unbounded (features): the range let infinities through, and float32 would overflow to them
    if (low == -np.inf or high == np.inf) and not np.abs(batch).max() <= FLOAT32_MAX:
        raise InvalidInput("the input contains NaN or infinite values, or values beyond float32")
    return np.ascontiguousarray(batch, dtype=np.float32)


def batch_from_image(
    body: bytes, meta: ModelMetadata, max_pixels: int, deadline: float | None = None
) -> np.ndarray:
    """Decode one uploaded image into a ``(1, H, W)`` batch shaped for the model.

    Decoding has a budget, like the model call: the pixels (``SERVING_MAX_IMAGE_PIXELS``), the
    decoded buffer (4 bytes a pixel at most: 16-bit or float modes of that size are refused), the
    work of a progressive JPEG (``MAX_JPEG_SCANS`` scans), how many decodes a worker runs at once
    (``DECODE_SLOTS``: their buffers, not the clients, bound its memory), and the request's deadline
    (``deadline``, a ``time.perf_counter()`` value: a decode that cannot start before it is a 503,
    one that ends after it a 504). A JPEG is decoded at the smallest DCT scale that still gives the
    framing 8x the model's resolution; any other picture is reduced to it before it is converted.
    """
    from PIL import Image, PngImagePlugin

    if not meta.is_image:
        raise UnsupportedMediaType(
            f"model {meta.name} takes {meta.describe_input()}, not pictures: send JSON"
            ' {"data": [[...], ...]}'
        )
    if not body:
        raise BadRequest("the image body is empty")
    PngImagePlugin.MAX_TEXT_CHUNK, PngImagePlugin.MAX_TEXT_MEMORY = MAX_TEXT_CHUNK, MAX_TEXT_MEMORY
    # a marker cannot occur inside entropy-coded data (0xFF is stuffed there): counting is exact
    scans = body.count(b"\xff\xda") if body[:2] == b"\xff\xd8" else 0
    if scans > MAX_JPEG_SCANS:
        raise PayloadTooLarge(f"the JPEG has {scans} scans; at most {MAX_JPEG_SCANS} are decoded")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(body), formats=IMAGE_FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise PayloadTooLarge(
                    f"the image is {width}x{height} pixels; the limit is {max_pixels} pixels"
                    " (SERVING_MAX_IMAGE_PIXELS)"
                )
            decoded = width * height * BYTES_PER_PIXEL.get(image.mode, 8)
            if decoded > 4 * max_pixels:
                raise PayloadTooLarge(
                    f"the image decodes to {decoded} bytes ({image.mode}, {width}x{height}); the"
                    f" limit is {4 * max_pixels} (4 bytes a pixel of SERVING_MAX_IMAGE_PIXELS)"
                )
            gray = _decode_within(image, meta.input_shape, deadline)
    except (PayloadTooLarge, QueueFull, DeadlineExceeded):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise PayloadTooLarge("the image decompresses to too many pixels") from None
    # Pillow's decoders raise more than OSError (NotImplementedError, struct.error, ...): all 400
    except Exception:
        raise BadRequest(
            "the body is not a readable image (PNG, JPEG, GIF, BMP, WebP or TIFF)"
        ) from None
    if gray.size == 0:
        raise BadRequest("the image has no pixels")
    low, high = meta.input_range
    frame = model_input(gray, meta.input_shape)
    return (frame * (high - low) + low).reshape(1, *frame.shape).astype(np.float32)


def _decode_within(image: Any, shape: tuple[int, int], deadline: float | None) -> np.ndarray:
    """Decode ``image`` in one of the worker's ``DECODE_SLOTS``, reduced toward 8x ``shape``."""
    wait = None if deadline is None else max(0.0, deadline - time.perf_counter())
    if not DECODE_SLOTS.acquire(timeout=-1 if wait is None else wait):
        raise QueueFull("every image decoder of this worker is busy; retry shortly")
    try:
        wanted = (REDUCE_TO * shape[1], REDUCE_TO * shape[0])
        if image.format == "JPEG":
            image.draft("L" if image.mode in ("L", "1") else "RGB", wanted)
        image.load()
        factor = min(image.size[0] // wanted[0], image.size[1] // wanted[1])
        if factor > 1:
            image = image.reduce(factor)
        gray = _grayscale(image)
    finally:
        DECODE_SLOTS.release()
    if deadline is not None and time.perf_counter() > deadline:
        raise DeadlineExceeded("the image took longer to decode than the request deadline allows")
    return gray


def _grayscale(image: Any) -> np.ndarray:
    """Decode to 0..255 grayscale; transparent pixels become the background, whatever colour they
    hide.

    Drawing apps export strokes on a transparent canvas whose hidden colour is often black, the same
    as the strokes: flattening it onto the colour that contrasts with the opaque pixels keeps the
    ink.
    """
    if image.mode not in ("RGBA", "LA", "PA") and "transparency" not in image.info:
        return np.asarray(image.convert("L"), dtype=np.uint8)
    rgba = image.convert("RGBA")
    alpha = np.asarray(rgba.getchannel("A"), dtype=np.float32) / 255.0
    gray = np.asarray(rgba.convert("L"), dtype=np.float32)
    opaque = alpha > 0.5
    background = 0.0 if opaque.any() and gray[opaque].mean() > 127.5 else 255.0
    return np.rint(gray * alpha + background * (1.0 - alpha)).astype(np.uint8)
