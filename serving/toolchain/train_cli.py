"""``python train.py`` / ``serving train``: train classifiers and publish them into the model
repository.

    python train.py                          # real MNIST: mnist-torch (lenet, 2 epochs), >= 0.99
    python train.py --dataset mnist --framework all   # mnist-tf and mnist-torch
    python train.py --dataset digits         # Keras + PyTorch small CNNs on the bundled 8x8 digits
    python train.py --dataset iris           # the tutorial's scikit-learn SVM, through skl2onnx
    python train.py --dataset mnist --data-dir ~/mnist --no-download

MNIST is looked for in ``--data-dir``, then ``$MNIST_DIR``, then the per-user cache
(``$XDG_CACHE_HOME/serving/mnist``, default ``~/.cache/serving/mnist``); when none has it, it is
downloaded into the cache from the mirrors torchvision uses (``$MNIST_MIRRORS`` overrides them:
base URLs separated by spaces or commas) and every file is checked against its published sha256.
Without ``--dataset``, a run that cannot have MNIST (offline, ``--no-download``, a bad mirror) says
why in one line and trains the bundled 8x8 digits instead; ``--dataset mnist`` fails instead.

Each run writes ``<out>/<name>/<N+1>/`` with the native model, its ONNX export (checked against the
native model on the test split), labels.json, sample.json and metadata.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from serving.store.repository import valid_name
from serving.toolchain.data import (
    DATASETS,
    Dataset,
    DatasetError,
    load_dataset,
    locate_mnist,
    mirrors_from,
    mnist_cache_dir,
)
from serving.toolchain.export import ExportError
from serving.toolchain.nets import ARCHS
from serving.toolchain.training import (
    DEFAULT_FRAMEWORKS,
    FRAMEWORKS,
    SKLEARN,
    TrainConfig,
    TrainingError,
    default_arch,
    defaults,
    model_name,
    train,
)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; see ``python train.py --help``."""
    parser = argparse.ArgumentParser(
        description="Train TensorFlow/Keras and PyTorch CNNs (or a scikit-learn SVM on iris) and"
        " publish native + ONNX versions into the model repository (<out>/<name>/<version>/).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--framework",
        choices=[*FRAMEWORKS, SKLEARN, "all"],
        default=None,
        help="which framework(s); None: the dataset's (mnist: pytorch; digits: all, that is"
        " tensorflow and pytorch; iris: sklearn)",
    )
    parser.add_argument(
        "--dataset",
        choices=DATASETS,
        default=None,
        help="mnist: the 28x28 MNIST (found or downloaded); digits: bundled 8x8 scikit-learn"
        " digits; iris: bundled iris measurements (feature rows); None: mnist, or digits with"
        " one line saying why when MNIST cannot be had",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="directory with the MNIST IDX files (plain or .gz) or mnist.npz, searched before "
        "$MNIST_DIR and the per-user cache",
    )
    parser.add_argument(
        "--no-download",
        action="store_true",
        help="fail instead of downloading MNIST when no searched directory has it",
    )
    parser.add_argument(
        "--limit-train",
        type=positive_int,
        default=None,
        metavar="N",
        help="train on the first N training samples only (quick runs and tests)",
    )
    parser.add_argument(
        "--limit-test",
        type=positive_int,
        default=None,
        metavar="N",
        help="evaluate on the first N test samples only",
    )
    parser.add_argument(
        "--arch",
        choices=[*ARCHS, "svc"],
        default=None,
        help="small: fast CNN; lenet: LeNet-style CNN with batch norm; large: compute-heavy CNN"
        " for batching benchmarks; None: small on digits, lenet on mnist, svc on iris",
    )
    parser.add_argument(
        "--epochs",
        type=positive_int,
        default=None,
        help="training epochs; None: the arch's recipe for the dataset (20 small / 10 large on "
        "digits, 2 lenet on mnist)",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="training batch size; None: the recipe's (32 small / 64 large on digits, 128 on"
        " mnist)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for the split, initialisation and shuffling"
    )
    parser.add_argument(
        "--name",
        default=None,
        help="model name (default <dataset>-tf / <dataset>-torch for the dataset's default arch, "
        "<dataset>-<arch>-tf / -torch for others); with --framework all, NAME-tf and NAME-torch",
    )
    parser.add_argument("--out", type=Path, default=Path("models"), help="model repository root")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Train every requested model; exit 0 on success, 2 on bad input, 1 when an export fails its
    check."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = parse_args(argv)
    started = time.monotonic()
    try:
        dataset = load(args)
    except DatasetError as exc:
        return fail(str(exc))
    args.arch = args.arch or default_arch(args.dataset)
    if args.framework is None:
        frameworks = list(DEFAULT_FRAMEWORKS[args.dataset])
    else:
        frameworks = list(FRAMEWORKS) if args.framework == "all" else [args.framework]
    tabular = dataset.kind == "features"
    if tabular != (frameworks == [SKLEARN]) or tabular != (args.arch == "svc"):
        return fail(
            f"--dataset {args.dataset} trains "
            + ("--framework sklearn --arch svc" if tabular else "tensorflow or pytorch CNNs")
            + f", not --framework {args.framework or frameworks[0]} --arch {args.arch}"
        )
    names = [
        model_name(args.dataset, fw, args.arch, args.name, several=len(frameworks) > 1)
        for fw in frameworks
    ]
    for name in names:
        if not valid_name(name):
            return fail(
                f"invalid model name {name!r}: use letters, digits, '.', '_' and '-' (at most 64)"
            )
    recipe = defaults(args.arch, args.dataset)
    epochs = args.epochs or recipe.epochs
    batch_size = args.batch_size or recipe.batch_size
    print(
        f"dataset {dataset.name}: {len(dataset.y_train)} train / {len(dataset.y_test)} test "
        f"samples, shape {dataset.shape}",
        flush=True,
    )
    results = []
    try:
        for framework, name in zip(frameworks, names, strict=True):
            config = TrainConfig(
                framework,
                name,
                args.arch,
                epochs,
                batch_size,
                args.seed,
                args.out,
                recipe.schedule,
                recipe.rate,
            )
            what = "" if tabular else f", {epochs} epochs"
            print(f"training {name} ({framework}, {args.arch}{what})", flush=True)
            result = train(config, dataset, log=say)
            print(
                f"{name}: held-out accuracy {result.accuracy:.4f} on {len(dataset.y_test)} "
                f"samples, ONNX max abs diff {result.onnx_max_abs_diff:.2g} "
                f"({result.seconds:.1f}s)",
                flush=True,
            )
            results.append(result)
    except (TrainingError, ExportError) as exc:
        return fail(str(exc), code=1)
    for result in results:
        print(f"wrote {result.path}/  accuracy {result.accuracy:.4f}")
    print(f"done in {time.monotonic() - started:.1f}s")
    return 0


def load(args: argparse.Namespace) -> Dataset:
    """The requested dataset, MNIST found (or downloaded) as the module docstring says, cut to
    the limits. Without ``--dataset``, MNIST when it can be had, else the digits (one line says
    why); ``args.dataset`` is set to the one loaded."""
    data_dir = None
    if args.dataset in ("mnist", None):
        candidates = [Path(d) for d in (args.data_dir, os.environ.get("MNIST_DIR")) if d]
        mirrors = None if args.no_download else mirrors_from(os.environ.get("MNIST_MIRRORS"))
        try:
            data_dir = locate_mnist(candidates, mnist_cache_dir(os.environ), mirrors, log=say)
            args.dataset = "mnist"
            say(f"MNIST from {data_dir}")
        except DatasetError as exc:
            if args.dataset == "mnist":
                raise
            args.dataset = "digits"
            say(
                f"training the bundled 8x8 digits instead of MNIST ({' '.join(str(exc).split())});"
                " for MNIST, pass --data-dir DIR or set MNIST_DIR to a folder with its four IDX"
                " files, or let train.py download them (no --no-download)"
            )
    return load_dataset(args.dataset, data_dir, args.seed).head(args.limit_train, args.limit_test)


def say(line: str) -> None:
    """Progress goes to stdout at once: a training run is watched live."""
    print(line, flush=True)


def fail(message: str, code: int = 2) -> int:
    """Print a one-line error and return the exit code."""
    print(f"error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
