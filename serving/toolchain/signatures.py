"""Reading a classifier's own description of its input and output, for ``serving import``.

ONNX graph inputs and outputs (``serving.toolchain.onnx_signature``: skl2onnx's label, probability
and ZipMap outputs, its class list), the SavedModel ``serving_default`` signature (read from the
protobuf, no TensorFlow), Keras ``model.inputs``; TorchScript records no shapes, so its layout is
found by calling it on a blank input of the ``--input-shape`` given, in each layout the server can
send. An input is an image or a feature vector (``serving.store.tfserving.input_layout``: a flat
input is a feature vector unless it is a square of side 8 or more; ``--input`` says which).
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving.store.tfserving import input_layout, read_signature

FORMATS = {
    ".keras": "keras",
    ".onnx": "onnx",
    ".pt": "torchscript",
    ".pth": "torchscript",
    ".ts": "torchscript",
}
KINDS = ("auto", "image", "features")


class ImportRefused(Exception):
    """The model cannot be imported; the message says why in one line."""


@dataclass
class Signature:
    """What the server needs to know of a model's input and output."""

    input_name: str
    layout: str
    shape: tuple[int, ...]  # one sample: (H, W) of an image, (N,) of a feature vector
    dtype: str
    output_name: str
    classes: int
    #: the class of each score, as the model records it (skl2onnx: its classes_), when it does
    class_labels: list[Any] | None = None
    #: a ZipMap output (a sequence of {class: probability} maps): its keys, in column order
    output_keys: list[Any] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        """image or features."""
        return "image" if len(self.shape) == 2 else "features"


def detect(path: Path) -> str:
    """The format of ``path``: keras, savedmodel, torchscript or onnx."""
    if not path.exists():
        raise ImportRefused(f"no such file or folder: {path}")
    if path.is_dir():
        if (path / "saved_model.pb").is_file():
            return "savedmodel"
        raise ImportRefused(
            f"{path} is a folder without saved_model.pb: not a TensorFlow SavedModel"
        )
    if path.suffix == ".h5":
        raise ImportRefused(
            f"{path}: HDF5 Keras files are not read; load it and save it as .keras (Keras v3)"
        )
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ImportRefused(
            f"{path}: unknown format {path.suffix or '(no suffix)'!r}; import a .keras file, a"
            " SavedModel folder, a TorchScript .pt or an .onnx file"
        )
    return fmt


def signature(
    fmt: str, path: Path, input_shape: tuple[int, ...] | None, kind: str = "auto"
) -> Signature:
    """Read the model's input and output from its own description (and, for TorchScript, by
    trying); an ONNX model's is ``serving.toolchain.onnx_signature``'s."""
    return {
        "keras": _keras_signature,
        "savedmodel": _savedmodel_signature,
        "torchscript": _torchscript_signature,
    }[fmt](path, input_shape, kind)


def layout_of(dims: list[int], where: str, kind: str) -> tuple[str, tuple[int, ...]]:
    """The layout and one sample's shape of an input's dims (batch first), or a one-line
    refusal."""
    try:
        return input_layout(dims, kind)
    except ValueError as exc:
        raise ImportRefused(f"{where}: {exc}") from None


def _keras_signature(path: Path, _: tuple[int, ...] | None, kind: str) -> Signature:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    try:
        model = keras.saving.load_model(str(path), compile=False, safe_mode=True)
    except Exception as exc:
        if "safe_mode" in str(exc) or "unsafe" in str(exc).lower() or "lambda" in str(exc).lower():
            raise ImportRefused(
                f"{path} needs safe_mode=False to load (a Lambda layer or custom code): models are"
                " code, and the server loads none that can run arbitrary code"
            ) from None
        raise ImportRefused(
            f"{path} is not a loadable Keras model ({exc.__class__.__name__}: {exc})"
        ) from None
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ImportRefused(
            f"{path} has {len(model.inputs)} inputs and {len(model.outputs)} outputs; a classifier"
            " here takes one input and returns one score per class"
        )
    dims = [-1 if d is None else int(d) for d in model.inputs[0].shape]
    layout, shape = layout_of(dims, f"{path} input", kind)
    dtype = "uint8" if "uint8" in str(model.inputs[0].dtype) else "float32"
    return Signature(
        "input", layout, shape, dtype, "probabilities", int(model.outputs[0].shape[-1] or -1)
    )


def _savedmodel_signature(path: Path, _: tuple[int, ...] | None, kind: str) -> Signature:
    from serving.errors import ModelLoadError

    try:
        found = read_signature(path)
    except ModelLoadError as exc:
        raise ImportRefused(str(exc)) from None
    if len(found["inputs"]) != 1 or len(found["outputs"]) != 1:
        raise ImportRefused(
            f"{path}: the serving_default signature has {len(found['inputs'])} inputs and"
            f" {len(found['outputs'])} outputs; a classifier here takes one input"
        )
    ((input_name, (dtype, dims)),) = found["inputs"].items()
    ((output_name, (_, out)),) = found["outputs"].items()
    if dtype not in ("float32", "uint8"):
        raise ImportRefused(f"{path}: input {input_name!r} is {dtype}, not float32 or uint8")
    layout, shape = layout_of(dims, f"{path} input {input_name!r}", kind)
    return Signature(input_name, layout, shape, dtype, output_name, out[-1] if out else -1)


def _torchscript_signature(path: Path, input_shape: tuple[int, ...] | None, kind: str) -> Signature:
    import torch

    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile:
        raise ImportRefused(f"{path} is not a TorchScript archive") from None
    if not any(name.endswith("constants.pkl") for name in names):
        raise ImportRefused(
            f"{path} is a pickled PyTorch model, not TorchScript: unpickling runs arbitrary code;"
            " export it with torch.jit.script(model).save(path) (or torch.jit.trace)"
        )
    if input_shape is None:
        raise ImportRefused(
            f"{path}: TorchScript does not record its input shape; pass --input-shape H,W (an"
            " image) or --input-shape N (a feature vector)"
        )
    try:
        module = torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as exc:
        raise ImportRefused(
            f"{path} is not loadable TorchScript ({exc.__class__.__name__})"
        ) from None
    if len(input_shape) == 1 or kind == "features":
        size = input_shape[0] if len(input_shape) == 1 else input_shape[0] * input_shape[1]
        tries: tuple[tuple[str, tuple[int, ...]], ...] = (("flat", (1, size)),)
        shape: tuple[int, ...] = (size,)
    else:
        height, width = input_shape
        shape = (height, width)
        tries = (
            ("NCHW", (1, 1, height, width)),
            ("NHW", (1, height, width)),
            ("flat", (1, height * width)),
            ("NHWC", (1, height, width, 1)),
        )
    for layout, dims in tries:
        try:
            with torch.inference_mode():
                output = module(torch.zeros(dims))
        except Exception:  # this layout is not the one the module takes; try the next
            continue
        if isinstance(output, torch.Tensor) and output.dim() == 2 and output.shape[0] == 1:
            classes = int(output.shape[1])
            return Signature("input", layout, shape, "float32", "probabilities", classes)
    shapes = " or ".join(f"[N, {', '.join(str(d) for d in dims[1:])}]" for _, dims in tries)
    raise ImportRefused(f"{path}: no input of shape {shapes} gives one score per class")
