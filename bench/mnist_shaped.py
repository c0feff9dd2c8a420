"""An MNIST-shaped (28x28) model made locally, without downloading anything.

    python -m bench.mnist_shaped [--data-dir DIR] [--repo models] [--name mnist28-torch] [--side 28]

The product serves MNIST-style classifiers, whose inputs are 28x28, but MNIST itself cannot be
downloaded here. This stands in for it honestly: it takes scikit-learn's bundled 8x8 digits (1,797
images, the same stratified, seeded 80/20 split as ``serving.toolchain.data.load_digits_dataset``), upscales each
image to 20x20 with PIL's bilinear filter and centres it on a black 28x28 canvas (MNIST's own framing:
a 20x20 box with a 4-pixel margin), stores it as uint8 0..255 like MNIST, and writes the four
standard MNIST IDX files (``train-images-idx3-ubyte`` and friends, the names ``serving.toolchain.data.load_mnist``
looks for) into ``--data-dir``. It then trains through the real user path::

    python train.py --dataset mnist --arch small --data-dir DIR --framework pytorch --name mnist28-torch --out REPO \\
        --epochs 20 --batch-size 32

The result is a ``small`` CNN with 28x28 inputs (it is *not* trained on MNIST: its metadata says
``dataset: mnist`` because that is the loader it came through). The epochs and batch size are the
digits recipe, not the MNIST defaults (3 epochs of 128, sized for 60,000 images): there are only 1,437
training images here. ``bench/v2.py`` calls ``ensure_model`` when the model is missing.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench.harness import ROOT
from serving.toolchain.data import MNIST_FILES, load_digits_dataset, load_mnist, write_idx

NAME = "mnist28-torch"
SIDE = 28
BOX = 20  # MNIST centres each digit's 20x20 box in the 28x28 image; so do we
EPOCHS = 20  # the digits recipe (serving.toolchain.training.DEFAULTS["small", "digits"]): same 1,437 training images
BATCH_SIZE = 32


def upscale(images: np.ndarray, side: int = SIDE, box: int = BOX) -> np.ndarray:
    """(N, h, w) floats in [0, 1] -> (N, side, side) uint8 0..255: each image resized to ``box`` x ``box``
    with PIL's bilinear filter and centred on a black ``side`` x ``side`` canvas, as MNIST frames its digits."""
    from PIL import Image

    if not 1 <= box <= side:
        raise ValueError(f"box must be between 1 and side ({side}), got {box}")
    out = np.zeros((len(images), side, side), dtype=np.uint8)
    top = (side - box) // 2
    for index, image in enumerate(images):
        resized = Image.fromarray(np.asarray(image, dtype=np.float32) * 255.0).resize(
            (box, box), Image.Resampling.BILINEAR)
        out[index, top:top + box, top:top + box] = np.clip(np.rint(np.asarray(resized)), 0, 255).astype(np.uint8)
    return out


def write_mnist_shaped(data_dir: Path, side: int = SIDE, seed: int = 0) -> Path:
    """Write the upscaled digits as the four MNIST IDX files into ``data_dir``; returns ``data_dir``.

    Reads them back with ``serving.toolchain.data.load_mnist`` (the loader ``train.py`` uses) before returning.
    """
    digits = load_digits_dataset(seed=seed)
    arrays = {
        "x_train": upscale(digits.x_train, side, min(BOX, side)),
        "y_train": digits.y_train.astype(np.uint8),
        "x_test": upscale(digits.x_test, side, min(BOX, side)),
        "y_test": digits.y_test.astype(np.uint8),
    }
    data_dir.mkdir(parents=True, exist_ok=True)
    for key, stem in MNIST_FILES.items():
        write_idx(data_dir / stem, arrays[key])
    loaded = load_mnist(data_dir)
    assert loaded.shape == (side, side) and np.array_equal(loaded.y_test, digits.y_test), "IDX round trip failed"
    return data_dir


def train_model(data_dir: Path, repo: Path, name: str = NAME) -> None:
    """Train and publish ``name`` from the IDX files in ``data_dir`` with ``train.py``, as a user would."""
    command = [sys.executable, "train.py", "--dataset", "mnist", "--arch", "small", "--data-dir", str(data_dir),
               "--framework", "pytorch",
               "--name", name, "--out", str(repo), "--epochs", str(EPOCHS), "--batch-size", str(BATCH_SIZE)]
    print(" ".join(["python", *command[1:]]), flush=True)
    subprocess.run(command, cwd=ROOT, check=True)


def make_model(repo: Path, name: str = NAME, side: int = SIDE, data_dir: Path | None = None) -> None:
    """Write the IDX files (into ``data_dir``, else a temporary directory) and train ``name`` from them."""
    if data_dir is not None:
        train_model(write_mnist_shaped(data_dir, side), repo, name)
        return
    with tempfile.TemporaryDirectory(prefix="mnist-shaped-") as tmp:
        train_model(write_mnist_shaped(Path(tmp), side), repo, name)


def ensure_model(repo: Path, name: str = NAME, side: int = SIDE) -> None:
    """Make ``<repo>/<name>`` with ``make_model`` unless it already has a version."""
    if (repo / name).is_dir() and any(p.name.isdigit() for p in (repo / name).iterdir()):
        return
    print(f"{name} is missing: writing {side}x{side} upscaled digits as MNIST IDX files and training it", flush=True)
    make_model(repo, name, side)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="where to write the IDX files (kept); default: a temporary directory, removed after")
    parser.add_argument("--repo", type=Path, default=ROOT / "models", help="model repository")
    parser.add_argument("--name", default=NAME, help="model name")
    parser.add_argument("--side", type=int, default=SIDE, help="image side in pixels")
    parser.add_argument("--idx-only", action="store_true", help="write the IDX files into --data-dir, do not train")
    args = parser.parse_args()
    if args.idx_only:
        if args.data_dir is None:
            parser.error("--idx-only needs --data-dir")
        print(f"wrote {write_mnist_shaped(args.data_dir, args.side)}/")
        return
    if (args.repo / args.name).is_dir():
        print(f"note: {args.repo / args.name} exists; train.py publishes the next version", flush=True)
    make_model(args.repo, args.name, args.side, args.data_dir)


if __name__ == "__main__":
    main()
