"""One uploaded digit image -> the model's input, made the way the training images were made.

MNIST (LeCun et al.): each digit was cropped to its ink, scaled keeping its aspect ratio so the
longer side fills a 20x20 box (anti-aliased, hence the grey edges), and placed in a 28x28 frame
so that its centre of mass sits on pixel (14, 14). scikit-learn's 8x8 digits (UCI optdigits): each
digit was scaled into a 32x32 *binary* bitmap and every 4x4 block's count of ink pixels (0..16)
became one input value. A model sees its training distribution only if an upload goes through the
same steps, so:

- 28x28 models get LeCun's procedure;
- any other H x W model gets the optdigits one on a (4H) x (4W) bitmap, thin strokes grown to
  optdigits' thickness: 32x32 -> 8x8 for the bundled digits, values the ink share of each block;
- a picture that already has the model's H x W (an MNIST PNG, a scikit-learn digit) is a dataset
  sample: it keeps its pixels.

Both start from ``ink_map``: grayscale, light-on-dark (a light background is inverted), background
at 0 and the strongest ink at 1, so a photo of pencil on grey paper looks like a scan. Everything
here works on decoded pixels; ``serving.protocol.inputs.batch_from_image`` decodes and guards the
upload.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

MNIST_SIDE = 28
MNIST_BOX = 20  # the longer side of the digit, in pixels of the 28x28 frame
MNIST_CENTRE = 14.0  # where the centre of mass lands: t10k's mean is (13.99, 14.01), integer shifts
BLOCK = 4  # optdigits: 4x4 blocks of a 32x32 bitmap per input value
# The digit's box is where ink rises above this fraction of the image's contrast. A blurred edge's
# true position is near half height; a little lower keeps faint strokes. Measured on t10k digits
# re-rendered 2x and 4x (bicubic), 0.35 gives back MNIST's own box best (median correlation with the
# original 0.98-0.996; 0.2 lets the blur widen the box: 0.95 at 2x). At 1x it reproduces the t10k
# images exactly.
INK_THRESHOLD = 0.35
# Inside the box, what stays below this is cleared: JPEG ringing and paper grain are a few percent
# of the contrast.
NOISE_FLOOR = 0.1
MIN_CONTRAST = 0.1  # a page whose darkest and lightest pixels differ by less holds no digit
# optdigits' strokes are thicker than MNIST's: 9.1% of scikit-learn's digit cells are full (16 of
# 16), 3.4% of t10k digits framed the same way. Strokes whose mean width (2 x area / boundary
# pixels, at half ink) is under THIN_STROKE grow by STROKE_GROWTH (both per 32 bitmap rows).
# Measured on 600 t10k digits re-rendered as JPEG uploads by bench/upload_accuracy.py and on
# scikit-learn's 360 held-out digits drawn 8x larger: strokes have a median width of 3.1 and 4.1;
# growing thin strokes only, they read 0.608 / 0.657 and 0.956 / 0.961 (digits-tf / digits-torch);
# growing all 0.613 / 0.662 and 0.886 / 0.889; growing none 0.587 / 0.642 and 0.961 / 0.967.
THIN_STROKE = 3.5
STROKE_GROWTH = 1
# a pixel at half ink or more belongs to the stroke when its width is measured
BITMAP_THRESHOLD = 0.5


def ink_map(gray: np.ndarray) -> np.ndarray:
    """0..255 grayscale (H, W) -> float32 ink in [0, 1]: background 0, strongest ink 1,
    light-on-dark.

    The background is the median of the border pixels (a digit rarely covers half of its frame);
    when it is light, the image is inverted. A page without contrast gives all zeros.
    """
    pixels = np.asarray(gray, dtype=np.float32) / 255.0
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = float(np.median(border))
    if background > 0.5:
        pixels, background = 1.0 - pixels, 1.0 - background
    contrast = float(pixels.max()) - background
    if contrast < MIN_CONTRAST:
        return np.zeros_like(pixels)
    return np.clip((pixels - background) / contrast, 0.0, 1.0)


def crop_to_ink(ink: np.ndarray) -> np.ndarray | None:
    """The bounding box of the pixels above ``INK_THRESHOLD``, noise below ``NOISE_FLOOR``
    cleared; None if empty."""
    mask = ink > INK_THRESHOLD
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    crop = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    return np.where(crop > NOISE_FLOOR, crop, 0.0).astype(np.float32)


def fit_box(crop: np.ndarray, height: int, width: int) -> np.ndarray:
    """Scale ``crop`` keeping its aspect ratio so it just fits ``height`` x ``width``,
    anti-aliased."""
    scale = min(height / crop.shape[0], width / crop.shape[1])
    size = (
        min(width, max(1, round(crop.shape[1] * scale))),
        min(height, max(1, round(crop.shape[0] * scale))),
    )
    resized = Image.fromarray(crop).resize(size, Image.Resampling.LANCZOS)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def paste(frame: np.ndarray, patch: np.ndarray, top: int, left: int) -> np.ndarray:
    """``patch`` written into ``frame`` at (top, left), clipped at the frame's edges."""
    height, width = frame.shape
    t0, l0 = max(top, 0), max(left, 0)
    t1, l1 = min(top + patch.shape[0], height), min(left + patch.shape[1], width)
    if t0 < t1 and l0 < l1:
        frame[t0:t1, l0:l1] = patch[t0 - top : t1 - top, l0 - left : l1 - left]
    return frame


def mnist_frame(ink: np.ndarray) -> np.ndarray:
    """LeCun's procedure: crop, fit into 20x20, place by centre of mass in 28x28; float32 in [0,
    1]."""
    frame = np.zeros((MNIST_SIDE, MNIST_SIDE), dtype=np.float32)
    crop = crop_to_ink(ink)
    if crop is None:
        return frame
    digit = fit_box(crop, MNIST_BOX, MNIST_BOX)
    total = float(digit.sum())
    if total <= 0.0:
        return frame
    rows, cols = np.indices(digit.shape)
    com_row, com_col = float((rows * digit).sum()) / total, float((cols * digit).sum()) / total
    return paste(frame, digit, round(MNIST_CENTRE - com_row), round(MNIST_CENTRE - com_col))


def block_count_frame(ink: np.ndarray, height: int, width: int) -> np.ndarray:
    """optdigits' procedure for an ``height`` x ``width`` input: crop, fit into a (4H) x (4W)
    bitmap centred by its bounding box, thin strokes grown, and each 4x4 block's share of ink as
    the value: count/16 in [0, 1] for a binary bitmap, anti-aliased edges counted by their
    coverage."""
    rows, cols = BLOCK * height, BLOCK * width
    bitmap = np.zeros((rows, cols), dtype=np.float32)
    crop = crop_to_ink(ink)
    if crop is not None:
        scale = rows / 32.0
        grow = round(STROKE_GROWTH * scale)
        # room for the growth, if the strokes need it
        digit = fit_box(crop, rows - 2 * grow, cols - 2 * grow)
        if stroke_width(digit >= BITMAP_THRESHOLD) < THIN_STROKE * scale:
            digit = thicken(digit, grow)
        else:
            digit = fit_box(crop, rows, cols)
        paste(bitmap, digit, (rows - digit.shape[0]) // 2, (cols - digit.shape[1]) // 2)
    return bitmap.reshape(height, BLOCK, width, BLOCK).mean(axis=(1, 3))


def stroke_width(mask: np.ndarray) -> float:
    """Mean stroke width in pixels of a boolean drawing: a stroke of length L and width w has
    area L*w and about 2L boundary pixels, so w = 2 x area / boundary."""
    padded = np.pad(mask, 1)
    interior = mask.copy()
    for dy in range(3):
        for dx in range(3):
            interior &= padded[dy : dy + mask.shape[0], dx : dx + mask.shape[1]]
    boundary = int((mask & ~interior).sum())
    return 2.0 * float(mask.sum()) / boundary if boundary else 0.0


def thicken(values: np.ndarray, radius: int) -> np.ndarray:
    """Each pixel raised to the largest value within ``radius`` (a square window): strokes grow
    by ``radius`` on every side, and the result is ``2 * radius`` larger on each axis so that
    nothing is cut off at the edges."""
    padded = np.pad(values, 2 * radius)
    height, width = values.shape[0] + 2 * radius, values.shape[1] + 2 * radius
    grown = np.zeros((height, width), dtype=values.dtype)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            grown = np.maximum(grown, padded[dy : dy + height, dx : dx + width])
    return grown


def model_input(gray: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """One decoded 0..255 grayscale digit -> (H, W) float32 in [0, 1], made like the model's
    training data.

    A picture already the model's H x W is a dataset sample (an MNIST PNG, a scikit-learn digit),
    framed already: it keeps its pixels, only put light-on-dark. Framing it again would only blur
    it.
    """
    ink = ink_map(gray)
    if ink.shape == tuple(shape):
        return ink
    if tuple(shape) == (MNIST_SIDE, MNIST_SIDE):
        return mnist_frame(ink)
    return block_count_frame(ink, *shape)
