"""Reading a classifier's own description of its input and output, for ``serving import``.

ONNX graph inputs, the SavedModel ``serving_default`` signature (read from the protobuf, no
TensorFlow), Keras ``model.inputs``; TorchScript records no shapes, so its layout is found by
calling it on a blank image of the ``--input-shape`` given, in each layout the server can send.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

from serving.store.tfserving import input_layout, read_signature

FORMATS = {
    ".keras": "keras",
    ".onnx": "onnx",
    ".pt": "torchscript",
    ".pth": "torchscript",
    ".ts": "torchscript",
}


class ImportRefused(Exception):
    """The model cannot be imported; the message says why in one line."""


@dataclass
class Signature:
    """What the server needs to know of a model's input and output."""

    input_name: str
    layout: str
    shape: tuple[int, int]
    dtype: str
    output_name: str
    classes: int


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


def signature(fmt: str, path: Path, input_shape: tuple[int, int] | None) -> Signature:
    """Read the model's input and output from its own description (and, for TorchScript, by
    trying)."""
    return {
        "onnx": _onnx_signature,
        "keras": _keras_signature,
        "savedmodel": _savedmodel_signature,
        "torchscript": _torchscript_signature,
    }[fmt](path, input_shape)


def _layout(shape: list[int], where: str) -> tuple[str, tuple[int, int]]:
    try:
        return input_layout(shape)
    except ValueError as exc:
        raise ImportRefused(f"{where}: {exc}") from None


def _onnx_signature(path: Path, _: tuple[int, int] | None) -> Signature:
    import onnx
    from onnx.external_data_helper import uses_external_data

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ImportRefused(
            f"{path} is not a readable ONNX model ({exc.__class__.__name__})"
        ) from None
    if any(uses_external_data(tensor) for tensor in model.graph.initializer):
        raise ImportRefused(
            f"{path} keeps its weights in external data files; save it as one file"
            " (onnx.save(model, path, save_as_external_data=False))"
        )
    initializers = {tensor.name for tensor in model.graph.initializer}
    inputs = [value for value in model.graph.input if value.name not in initializers]
    if len(inputs) != 1 or len(model.graph.output) < 1:
        raise ImportRefused(
            f"{path} has {len(inputs)} inputs ({', '.join(v.name for v in inputs)}); a classifier"
            " here takes exactly one image"
        )
    dims = [
        d.dim_value if d.HasField("dim_value") else -1 for d in inputs[0].type.tensor_type.shape.dim
    ]
    types = {1: "float32", 2: "uint8"}
    dtype = types.get(inputs[0].type.tensor_type.elem_type)
    if dtype is None:
        raise ImportRefused(f"{path}: input {inputs[0].name!r} is not float32 or uint8")
    out = [
        d.dim_value if d.HasField("dim_value") else -1
        for d in model.graph.output[0].type.tensor_type.shape.dim
    ]
    layout, shape = _layout(dims, f"{path} input {inputs[0].name!r}")
    return Signature(
        inputs[0].name, layout, shape, dtype, model.graph.output[0].name, out[-1] if out else -1
    )


def _keras_signature(path: Path, _: tuple[int, int] | None) -> Signature:
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
            " here takes one image and returns one score per class"
        )
    dims = [-1 if d is None else int(d) for d in model.inputs[0].shape]
    layout, shape = _layout(dims, f"{path} input")
    dtype = "uint8" if "uint8" in str(model.inputs[0].dtype) else "float32"
    return Signature(
        "input", layout, shape, dtype, "probabilities", int(model.outputs[0].shape[-1] or -1)
    )


def _savedmodel_signature(path: Path, _: tuple[int, int] | None) -> Signature:
    from serving.errors import ModelLoadError

    try:
        found = read_signature(path)
    except ModelLoadError as exc:
        raise ImportRefused(str(exc)) from None
    if len(found["inputs"]) != 1 or len(found["outputs"]) != 1:
        raise ImportRefused(
            f"{path}: the serving_default signature has {len(found['inputs'])} inputs and"
            f" {len(found['outputs'])} outputs; a classifier here takes one image"
        )
    ((input_name, (dtype, dims)),) = found["inputs"].items()
    ((output_name, (_, out)),) = found["outputs"].items()
    if dtype not in ("float32", "uint8"):
        raise ImportRefused(f"{path}: input {input_name!r} is {dtype}, not float32 or uint8")
    layout, shape = _layout(dims, f"{path} input {input_name!r}")
    return Signature(input_name, layout, shape, dtype, output_name, out[-1] if out else -1)


def _torchscript_signature(path: Path, input_shape: tuple[int, int] | None) -> Signature:
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
            f"{path}: TorchScript does not record its input shape; pass --input-shape H,W"
        )
    try:
        module = torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as exc:
        raise ImportRefused(
            f"{path} is not loadable TorchScript ({exc.__class__.__name__})"
        ) from None
    height, width = input_shape
    for layout, dims in (
        ("NCHW", (1, 1, height, width)),
        ("NHW", (1, height, width)),
        ("flat", (1, height * width)),
        ("NHWC", (1, height, width, 1)),
    ):
        try:
            with torch.inference_mode():
                output = module(torch.zeros(dims))
        except Exception:  # this layout is not the one the module takes; try the next
            continue
        if isinstance(output, torch.Tensor) and output.dim() == 2 and output.shape[0] == 1:
            return Signature(
                "input", layout, (height, width), "float32", "probabilities", int(output.shape[1])
            )
    raise ImportRefused(
        f"{path}: no input of shape [N, 1, {height}, {width}], [N, {height}, {width}],"
        f" [N, {height * width}] or [N, {height}, {width}, 1] gives one score per class"
    )
