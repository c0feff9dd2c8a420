"""Train a Keras or PyTorch CNN (or, on a feature dataset, a scikit-learn model), export it natively
and to ONNX, and publish it as a repository version.

A run writes everything into a hidden staging directory next to the versions and then publishes it
(``serving.toolchain.publish``), so a serving process scanning ``<root>/<name>/`` never sees a
half-written version. The ONNX export is checked against the saved native model on the whole test
split before anything is published. Frameworks are imported inside the functions.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from serving.store.repository import NATIVE_ARTIFACTS, ONNX_ARTIFACT
from serving.toolchain.data import Dataset
from serving.toolchain.export import (
    INPUT_NAME,
    ONNX_OPSET,
    OUTPUT_NAME,
    check_onnx,
    export_tf_function,
    export_torch,
    in_chunks,
    onnxruntime_version,
)
from serving.toolchain.publish import publish, stage, write_json
from serving.toolchain.reference import from_training

#: The neural-network frameworks (image datasets); ``--framework all`` trains both.
FRAMEWORKS = ("tensorflow", "pytorch")
#: scikit-learn: the feature datasets' framework, exported with skl2onnx (``toolchain.tabular``).
SKLEARN = "sklearn"
NAME_SUFFIX = {"tensorflow": "tf", "pytorch": "torch"}
LAYOUT = {"tensorflow": "NHWC", "pytorch": "NCHW"}
#: What a dataset trains when ``--framework`` is not given: real MNIST (the default dataset) one
#: PyTorch net, fast enough for a first ``make serve`` (see DEFAULTS); the 8x8 digits both
#: frameworks; iris the scikit-learn SVM of the web-single-pattern tutorial.
DEFAULT_FRAMEWORKS = {"mnist": ("pytorch",), "digits": FRAMEWORKS, "iris": (SKLEARN,)}
# One thread: the small nets gain nothing from two, and under contention (tests, servers sharing the
# 2 cores) spinning thread pools made a 2-thread run 4x slower (measured again for the MNIST
# default: 17 s an epoch on one thread, 53 s on two, on a shared 2-core machine).
TRAIN_THREADS = 1
LEARNING_RATE = 1e-3  # Adam's; the cosine schedules decay it to 0 by the last step
SCHEDULES = ("constant", "cosine", "onecycle")
#: onecycle: the share of the steps that warm the rate up linearly from 0 to its peak.
WARMUP = 0.1


class Recipe(NamedTuple):
    """Default epochs, batch size, learning-rate schedule and peak rate for an (arch, dataset)."""

    epochs: int
    batch_size: int
    schedule: str = "constant"
    rate: float = LEARNING_RATE


# Recipes that reliably reach their targets quickly on 2 cores: >= 0.95 on digits, >= 0.99 on the
# MNIST t10k for lenet. The MNIST default must also be quick, because `make serve` trains it on a
# fresh machine: two epochs of lenet under a one-cycle schedule (a linear warm-up to 3e-3 over the
# first tenth of the steps, then a cosine to 0) reach 0.99 where the same two epochs at a plain
# cosine from 1e-3 stop near 0.989 (one epoch: 0.988-0.990; see docs/guide.md). The large net trains
# on bigger batches: its optimizer step over 5M weights costs as much as the batch itself.
DEFAULTS = {
    ("small", "digits"): Recipe(20, 32),
    ("large", "digits"): Recipe(10, 64),
    ("small", "mnist"): Recipe(3, 128),
    ("large", "mnist"): Recipe(2, 128),
    ("lenet", "mnist"): Recipe(2, 128, "onecycle", 3e-3),
    ("svc", "iris"): Recipe(1, 1),
}
DEFAULT_ARCH = {"digits": "small", "mnist": "lenet", "iris": "svc"}

Log = Callable[[str], None]


class TrainingError(RuntimeError):
    """Training or export produced something unfit to publish (e.g. ONNX disagrees with the
    native model)."""


@dataclass(frozen=True)
class TrainConfig:
    """One training run: which framework, network, data and where to publish."""

    framework: str
    name: str
    arch: str = "small"
    epochs: int = 20
    batch_size: int = 32
    seed: int = 0
    out: Path = Path("models")
    schedule: str = "constant"
    rate: float = LEARNING_RATE


@dataclass(frozen=True)
class TrainResult:
    """Where a run published its version and how good it is."""

    name: str
    version: int
    path: Path
    accuracy: float
    onnx_max_abs_diff: float
    seconds: float


def defaults(arch: str, dataset: str) -> Recipe:
    """Default recipe for an architecture on a dataset."""
    return DEFAULTS.get((arch, dataset), Recipe(10, 64))


def default_arch(dataset: str) -> str:
    """The architecture a dataset trains with unless told otherwise: ``small`` for digits,
    ``lenet`` for MNIST, ``svc`` for iris."""
    return DEFAULT_ARCH.get(dataset, "small")


def model_name(
    dataset: str,
    framework: str,
    arch: str | None = None,
    base: str | None = None,
    several: bool = False,
) -> str:
    """Default ``digits-tf`` / ``mnist-torch`` for the dataset's default arch, ``digits-large-tf``
    for others, ``iris-svc`` for scikit-learn (the arch is the suffix); ``base`` X gives X, or X-tf
    when ``several``."""
    arch = arch or default_arch(dataset)
    suffix = NAME_SUFFIX.get(framework) or arch
    if base is None:
        if framework == SKLEARN:
            return f"{dataset}-{suffix}"
        return (
            f"{dataset}-{suffix}" if arch == default_arch(dataset) else f"{dataset}-{arch}-{suffix}"
        )
    return f"{base}-{suffix}" if several else base


def learning_rate(schedule: str, step: int, total_steps: int, peak: float = LEARNING_RATE) -> float:
    """The learning rate at ``step`` of ``total_steps``: constant, cosine-decayed from ``peak`` to 0
    (Keras' CosineDecay), or one-cycle (a linear warm-up from 0 to ``peak`` over the first
    ``WARMUP`` of the steps, then the cosine: Keras' CosineDecay with ``warmup_target``)."""
    if schedule == "constant":
        return peak
    warmup = warmup_steps(schedule, total_steps)
    if step < warmup:
        return peak * step / warmup
    if schedule in ("cosine", "onecycle"):
        decay = max(total_steps - warmup, 1)
        return peak * 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, decay) / decay))
    raise ValueError(f"unknown schedule {schedule!r} (choose from {', '.join(SCHEDULES)})")


def warmup_steps(schedule: str, total_steps: int) -> int:
    """How many of ``total_steps`` a schedule spends warming up (only onecycle does)."""
    return int(total_steps * WARMUP) if schedule == "onecycle" else 0


def train(config: TrainConfig, dataset: Dataset, log: Log = print) -> TrainResult:
    """Train, export, verify and publish one model; returns where it went."""
    started = time.monotonic()
    if config.framework not in RUNNERS:
        raise ValueError(
            f"unknown framework {config.framework!r} (choose from {', '.join(RUNNERS)})"
        )
    if config.schedule not in SCHEDULES:
        raise ValueError(
            f"unknown schedule {config.schedule!r} (choose from {', '.join(SCHEDULES)})"
        )
    staging = stage(config.out, config.name)
    try:
        outcome = RUNNERS[config.framework](config, dataset, staging, log)
        accuracy = float(np.mean(outcome.native.argmax(axis=1) == dataset.y_test))
        diff = outcome.onnx_max_abs_diff
        if diff is None:
            diff = check_onnx(
                staging / ONNX_ARTIFACT,
                outcome.native,
                _layout_input(config.framework, dataset.x_test),
                TRAIN_THREADS,
            )
        write_json(staging / "labels.json", dataset.labels)
        write_json(staging / "sample.json", _sample(dataset, outcome.native), indent=False)
        metadata = _metadata(config, dataset, accuracy, diff, outcome.versions)
        # drift: the training inputs' statistics and the model's predictions on the test set
        metadata["reference"] = from_training(
            dataset.x_train, outcome.native, dataset.labels, dataset.feature_names
        )
        version = publish(staging, config.out, config.name, metadata)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    model_dir = config.out / config.name
    return TrainResult(
        config.name, version, model_dir / str(version), accuracy, diff, time.monotonic() - started
    )


@dataclass(frozen=True)
class Outcome:
    """What a framework run hands back: the saved native model's test probabilities, library
    versions, and the ONNX check's result when the run checked its export itself."""

    native: np.ndarray
    versions: dict[str, str]
    onnx_max_abs_diff: float | None = None


def _epoch_line(config: TrainConfig, epoch: int, loss: float, accuracy: float) -> str:
    return (
        f"[{config.name}] epoch {epoch:>3}/{config.epochs}  loss {loss:.4f}"
        f"  accuracy {accuracy:.4f}"
    )


def _train_keras(config: TrainConfig, dataset: Dataset, staging: Path, log: Log) -> Outcome:
    """Fit the Keras model, save ``model.keras`` and ``model.onnx``; predict the test split with
    the saved file."""
    import keras
    import onnx
    import tensorflow as tf
    import tf2onnx

    from serving.toolchain.nets import build_keras

    try:  # only possible before TensorFlow runs its first op
        tf.config.threading.set_intra_op_parallelism_threads(TRAIN_THREADS)
        tf.config.threading.set_inter_op_parallelism_threads(TRAIN_THREADS)
    except RuntimeError:
        pass
    keras.utils.set_random_seed(config.seed)
    model = build_keras(config.arch, dataset.shape, dataset.num_classes)
    rate: float | keras.optimizers.schedules.LearningRateSchedule = config.rate
    # the same curve as learning_rate(), which the PyTorch loop applies per step
    if config.schedule != "constant":
        total = _total_steps(config, dataset)
        warmup = warmup_steps(config.schedule, total)
        rate = keras.optimizers.schedules.CosineDecay(
            0.0 if warmup else config.rate,
            total - warmup,
            warmup_target=config.rate if warmup else None,
            warmup_steps=warmup,
        )
    model.compile(
        optimizer=keras.optimizers.Adam(rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    progress = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: log(
            _epoch_line(config, epoch + 1, logs["loss"], logs["accuracy"])
        )
    )
    x_train = _layout_input("tensorflow", dataset.x_train)
    model.fit(
        x_train,
        dataset.y_train,
        batch_size=config.batch_size,
        epochs=config.epochs,
        shuffle=True,
        verbose=0,
        callbacks=[progress],
    )
    native_path = staging / NATIVE_ARTIFACTS["tensorflow"]
    model.save(native_path)

    spec = (tf.TensorSpec((None, *dataset.shape, 1), tf.float32, name=INPUT_NAME),)
    serve = tf.function(lambda x: model(x, training=False), input_signature=spec, autograph=False)
    export_tf_function(serve, spec, staging / ONNX_ARTIFACT)

    reloaded = keras.models.load_model(native_path)
    native = reloaded.predict(
        _layout_input("tensorflow", dataset.x_test), batch_size=256, verbose=0
    )
    versions = {
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "tf2onnx": tf2onnx.__version__,
        "onnx": onnx.__version__,
    }
    return Outcome(np.asarray(native, dtype=np.float32), versions)


def _train_torch(config: TrainConfig, dataset: Dataset, staging: Path, log: Log) -> Outcome:
    """Train the PyTorch model, save TorchScript ``model.pt`` and ``model.onnx``; predict with
    the saved file."""
    import onnx
    import torch
    import torch.nn.functional as F  # noqa: N812 - the conventional alias

    from serving.toolchain.nets import build_torch

    torch.set_num_threads(TRAIN_THREADS)
    torch.manual_seed(config.seed)
    model = build_torch(config.arch, dataset.shape, dataset.num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.rate, fused=True)
    step, total_steps = 0, _total_steps(config, dataset)
    logits_of = model[:-1]  # the same layers without the final softmax
    x_train = torch.from_numpy(_layout_input("pytorch", dataset.x_train))
    y_train = torch.from_numpy(dataset.y_train)
    generator = torch.Generator().manual_seed(config.seed)
    for epoch in range(1, config.epochs + 1):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        total_loss, correct = 0.0, 0
        for start in range(0, len(order), config.batch_size):
            batch = order[start : start + config.batch_size]
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config.schedule, step, total_steps, config.rate)
            step += 1
            logits = logits_of(x_train[batch])
            loss = F.cross_entropy(logits, y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total_loss += float(loss.item()) * len(batch)
            correct += int((logits.argmax(dim=1) == y_train[batch]).sum().item())
        log(_epoch_line(config, epoch, total_loss / len(order), correct / len(order)))

    model.eval()
    native_path = staging / NATIVE_ARTIFACTS["pytorch"]
    torch.jit.save(torch.jit.script(model), str(native_path))
    export_torch(model, x_train[:1], staging / ONNX_ARTIFACT)
    reloaded = torch.jit.load(str(native_path))
    with torch.inference_mode():
        native = in_chunks(
            lambda x: reloaded(torch.from_numpy(x)).numpy(),
            _layout_input("pytorch", dataset.x_test),
        )
    return Outcome(native, {"torch": torch.__version__, "onnx": onnx.__version__})


def _total_steps(config: TrainConfig, dataset: Dataset) -> int:
    """Optimizer steps in the whole run (what a schedule decays over)."""
    return config.epochs * math.ceil(len(dataset.y_train) / config.batch_size)


def _train_sklearn(config: TrainConfig, dataset: Dataset, staging: Path, log: Log) -> Outcome:
    from serving.toolchain.tabular import train_svc

    native, diff, versions = train_svc(config.name, config.seed, dataset, staging, log)
    return Outcome(native, versions, diff)


RUNNERS: dict[str, Callable[[TrainConfig, Dataset, Path, Log], Outcome]] = {
    "tensorflow": _train_keras,
    "pytorch": _train_torch,
    SKLEARN: _train_sklearn,
}


def _layout_input(framework: str, images: np.ndarray) -> np.ndarray:
    """(N, H, W) images in the framework's layout: NHWC for TensorFlow, NCHW for PyTorch."""
    axis = 3 if LAYOUT[framework] == "NHWC" else 1
    return np.ascontiguousarray(np.expand_dims(images, axis=axis), dtype=np.float32)


def _sample(dataset: Dataset, probabilities: np.ndarray) -> dict[str, Any]:
    """The first test sample the model classifies correctly, as a smoke test for the server."""
    correct = np.flatnonzero(probabilities.argmax(axis=1) == dataset.y_test)
    if correct.size == 0:
        raise TrainingError(
            "the model classifies no test sample correctly; nothing to use as sample.json"
        )
    index = int(correct[0])
    return {
        "data": dataset.x_test[index].tolist(),
        "label": dataset.labels[int(dataset.y_test[index])],
    }


def input_spec(framework: str, dataset: Dataset) -> dict[str, Any]:
    """``metadata.json``'s ``input``: an image (shape H x W, range [0, 1], the framework's layout)
    or a feature row (its names and the range of each in the training split, which is described,
    not enforced: a value outside it is a new flower, not an error)."""
    if dataset.kind == "features":
        return {
            "kind": "features",
            "name": INPUT_NAME,
            "shape": list(dataset.shape),
            "dtype": "float32",
            "layout": "flat",
            "range": None,
            "features": [
                {"name": name, "range": [low, high]}
                for name, (low, high) in zip(
                    dataset.feature_names, dataset.feature_ranges(), strict=True
                )
            ],
        }
    return {
        "kind": "image",
        "name": INPUT_NAME,
        "shape": list(dataset.shape),
        "dtype": "float32",
        "range": [0.0, 1.0],
        "layout": LAYOUT[framework],
    }


def _metadata(
    config: TrainConfig,
    dataset: Dataset,
    accuracy: float,
    diff: float,
    versions: dict[str, str],
) -> dict[str, Any]:
    """What ``metadata.json`` says of a trained version (``publish`` adds its number and
    digests)."""
    metadata: dict[str, Any] = {
        "name": config.name,
        "framework": config.framework,
        "arch": config.arch,
        "dataset": dataset.name,
        "input": input_spec(config.framework, dataset),
        "output": {"name": OUTPUT_NAME, "shape": [dataset.num_classes], "dtype": "float32"},
        "labels": dataset.labels,
        "test_accuracy": round(accuracy, 6),
        "test_samples": int(len(dataset.y_test)),
        "train_samples": int(len(dataset.y_train)),
        "seed": config.seed,
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "schedule": config.schedule,
        "learning_rate": config.rate,
        "onnx_max_abs_diff": diff,
        "onnx_opset": ONNX_OPSET,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": {**versions, "onnxruntime": onnxruntime_version(), "numpy": np.__version__},
    }
    if config.framework == SKLEARN:  # no native artifact the server could load safely: ONNX only
        metadata["backend"] = "onnx"
        for key in ("epochs", "batch_size", "schedule", "learning_rate"):
            del metadata[key]
    return metadata
