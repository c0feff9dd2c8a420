"""An ONNX classifier's input and output, read from its graph for ``serving import``.

Exports of neural networks have one input and one output, the scores. skl2onnx classifiers have two
outputs: the label first (INT64 or strings), then the probabilities, either a float tensor
``[N, classes]`` (``options={"zipmap": False}``) or, by default, a ZipMap: a sequence of
``{class: probability}`` maps. The served output is the probabilities: a float tensor of rank 2, or
else a ZipMap, preferring a name that says "prob"; the label output is never it. The classes are
the model's own when it records them (the ZipMap's keys, or the ``classlabels_*`` of an
``ai.onnx.ml`` classifier node), so a model fitted on ``["setosa", ...]`` gets those labels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from serving.toolchain.signatures import ImportRefused, Signature, layout_of

#: ONNX TensorProto element types the server sends: float32 (1), uint8 (2), float64 (11).
INPUT_TYPES = {1: "float32", 2: "uint8", 11: "float64"}
FLOAT_TYPES = (1, 10, 11)  # float, float16, double
#: The attributes of ai.onnx.ml classifier nodes (and ZipMap) that hold the class list.
CLASS_ATTRIBUTES = ("classlabels_strings", "classlabels_int64s", "classlabels_ints")
#: skl2onnx and onnxmltools write classical models, whose flat input is a feature vector.
TABULAR_PRODUCERS = ("skl2onnx", "onnxmltools", "OnnxMLTools")


def onnx_signature(path: Path, kind: str) -> Signature:
    """The signature of the ONNX model at ``path`` (``kind``: auto, image or features)."""
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
    graph = model.graph
    initializers = {tensor.name for tensor in graph.initializer}
    inputs = [value for value in graph.input if value.name not in initializers]
    if len(inputs) != 1 or len(graph.output) < 1:
        raise ImportRefused(
            f"{path} has {len(inputs)} inputs ({', '.join(v.name for v in inputs)}); a classifier"
            " here takes exactly one input tensor"
        )
    tensor = inputs[0].type.tensor_type
    dtype = INPUT_TYPES.get(tensor.elem_type)
    if dtype is None:
        raise ImportRefused(f"{path}: input {inputs[0].name!r} is not float32, float64 or uint8")
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
    tabular = model.producer_name in TABULAR_PRODUCERS or any(
        node.domain == "ai.onnx.ml" for node in graph.node
    )
    if kind == "auto" and tabular and len(dims) == 2:
        kind = "features"
    layout, shape = layout_of(dims, f"{path} input {inputs[0].name!r}", kind)
    output, keys = _probabilities_output(graph, path)
    class_labels = keys if keys is not None else _class_list(graph)
    out_dims = [
        d.dim_value if d.HasField("dim_value") else -1 for d in output.type.tensor_type.shape.dim
    ]
    classes = out_dims[-1] if out_dims and out_dims[-1] > 0 else -1
    if class_labels is not None and classes in (-1, len(class_labels)):
        classes = len(class_labels)
    elif class_labels is not None:  # the node's list does not describe this output's columns
        class_labels = None
    signature = Signature(
        inputs[0].name, layout, shape, dtype, output.name, classes, class_labels, keys
    )
    if len(graph.output) > 1:
        signature.notes.append(
            f"serves output {output.name!r} of {', '.join(o.name for o in graph.output)}"
        )
    return signature


def _probabilities_output(graph: Any, path: Path) -> tuple[Any, list[Any] | None]:
    """The output holding the probabilities, and a ZipMap's keys (None for a tensor)."""
    if len(graph.output) == 1 and graph.output[0].type.WhichOneof("value") == "tensor_type":
        return graph.output[0], None
    tensors, zipmaps = [], []
    for output in graph.output:
        kind = output.type.WhichOneof("value")
        if kind == "tensor_type":
            tensor = output.type.tensor_type
            if tensor.elem_type in FLOAT_TYPES and len(tensor.shape.dim) == 2:
                tensors.append(output)
        elif kind == "sequence_type" and output.type.sequence_type.elem_type.HasField("map_type"):
            zipmaps.append(output)
    for candidates in (tensors, zipmaps):
        candidates.sort(key=lambda output: "prob" not in output.name.lower())  # stable
    if tensors:
        return tensors[0], None
    if zipmaps:
        keys = _zipmap_keys(graph, zipmaps[0].name)
        if keys is None:
            raise ImportRefused(
                f"{path}: output {zipmaps[0].name!r} is a sequence of maps that no ZipMap node"
                " with class labels makes; export the probabilities as a tensor (skl2onnx:"
                ' options={"zipmap": False})'
            )
        return zipmaps[0], keys
    names = ", ".join(f"{o.name} ({_type_name(o)})" for o in graph.output)
    raise ImportRefused(
        f"{path}: no output holds the probabilities (a float tensor [N, classes] or a ZipMap);"
        f" its outputs are {names}"
    )


def _zipmap_keys(graph: Any, output_name: str) -> list[Any] | None:
    for node in graph.node:
        if node.op_type == "ZipMap" and output_name in node.output:
            return _class_attribute(node)
    return None


def _class_list(graph: Any) -> list[Any] | None:
    """The class list of the graph's classifier node (ai.onnx.ml), when it has exactly one."""
    lists = [
        found
        for node in graph.node
        if node.domain == "ai.onnx.ml" and node.op_type.endswith("Classifier")
        for found in [_class_attribute(node)]
        if found is not None
    ]
    return lists[0] if len(lists) == 1 else None


def _class_attribute(node: Any) -> list[Any] | None:
    for attribute in node.attribute:
        if attribute.name == "classlabels_strings" and attribute.strings:
            return [value.decode() for value in attribute.strings]
        if attribute.name in CLASS_ATTRIBUTES and attribute.ints:
            return [int(value) for value in attribute.ints]
    return None


def _type_name(output: Any) -> str:
    kind = output.type.WhichOneof("value")
    if kind == "tensor_type":
        import onnx

        return onnx.TensorProto.DataType.Name(output.type.tensor_type.elem_type).lower()
    return str(kind).replace("_type", "")
