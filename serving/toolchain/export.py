"""The ONNX copy of a model: export from Keras / TensorFlow or PyTorch, rename its I/O, check it.

``serving train`` exports every model it trains and ``serving import --export-onnx`` every model it
imports, with the same opset, names (``input`` -> ``probabilities``, a dynamic batch axis) and
tolerance, so the ONNX Runtime backend serves either kind the same way. Frameworks are imported
inside the functions.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ONNX_OPSET = 17
#: The largest difference allowed between the ONNX copy's outputs and the native model's.
ONNX_TOLERANCE = 1e-4
INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"


class ExportError(RuntimeError):
    """The ONNX copy is malformed or disagrees with the native model (the CLI prints it and exits
    1)."""


def export_tf_function(function: Any, spec: tuple[Any, ...], path: Path) -> None:
    """Convert a ``tf.function`` with input signature ``spec`` to ONNX at ``path``, with the
    served I/O names."""
    import onnx
    import tf2onnx

    onnx_model, _ = tf2onnx.convert.from_function(function, input_signature=spec, opset=ONNX_OPSET)
    rename_onnx_io(onnx_model, INPUT_NAME, OUTPUT_NAME)
    onnx.save(onnx_model, str(path))


def export_torch(module: Any, example: Any, path: Path) -> None:
    """Trace a PyTorch module on ``example`` to ONNX at ``path``, with the served names and a
    dynamic batch."""
    import torch

    torch.onnx.export(
        module,
        (example,),
        str(path),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        opset_version=ONNX_OPSET,
        dynamo=False,
    )


def rename_onnx_io(model: Any, input_name: str, output_name: str) -> None:
    """Rename an ONNX graph's single input and output (and every reference to them) in place."""
    graph = model.graph
    renames = {graph.input[0].name: input_name, graph.output[0].name: output_name}
    for node in graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]
        node.output[:] = [renames.get(name, name) for name in node.output]
    graph.input[0].name = input_name
    graph.output[0].name = output_name
    for value in (graph.input[0], graph.output[0]):  # tf2onnx names the batch axis "unk__NN"
        batch = value.type.tensor_type.shape.dim[0]
        if not batch.HasField("dim_value"):
            batch.dim_param = "batch"


def check_onnx(path: Path, expected: np.ndarray, inputs: np.ndarray, threads: int = 1) -> float:
    """Max abs difference between onnxruntime on ``path`` and the native outputs; ExportError if
    too large."""
    import onnx
    import onnxruntime as ort

    graph = onnx.load(str(path)).graph
    names = ([i.name for i in graph.input], [o.name for o in graph.output])
    if names != ([INPUT_NAME], [OUTPUT_NAME]):
        raise ExportError(
            f"{path.name} has inputs/outputs {names}, expected ([{INPUT_NAME!r}], "
            f"[{OUTPUT_NAME!r}])"
        )
    batch_dim = graph.input[0].type.tensor_type.shape.dim[0]
    if batch_dim.HasField("dim_value"):
        raise ExportError(
            f"{path.name} has a fixed batch dimension {batch_dim.dim_value}; it must be dynamic"
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    actual = in_chunks(lambda x: session.run([OUTPUT_NAME], {INPUT_NAME: x})[0], inputs)
    diff = float(np.max(np.abs(actual - expected)))
    if not diff < ONNX_TOLERANCE:
        raise ExportError(
            f"ONNX export disagrees with the native model: max abs diff {diff:.3g} >= "
            f"{ONNX_TOLERANCE}"
        )
    return diff


def in_chunks(
    predict: Callable[[np.ndarray], np.ndarray], inputs: np.ndarray, size: int = 500
) -> np.ndarray:
    """Run ``predict`` over ``inputs`` a chunk at a time (10k MNIST samples at once would need
    gigabytes)."""
    outputs = [predict(inputs[start : start + size]) for start in range(0, len(inputs), size)]
    return np.concatenate(outputs).astype(np.float32, copy=False)


def onnxruntime_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)
