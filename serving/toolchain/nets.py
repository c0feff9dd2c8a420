"""Network definitions shared by ``train.py`` and the tests, in Keras and PyTorch.

Three architectures, the same in both frameworks:

- ``small``: conv 16 -> conv 32 -> max-pool -> dense: reaches >= 0.95 on digits in seconds.
- ``lenet``: LeNet-5's shape with today's parts: conv 5x5 16 -> pool -> conv 5x5 32 -> pool ->
  dense 128 -> dropout -> dense, with batch norm after each conv, ReLU and max-pools. It is the
  MNIST default: 0.9936 on t10k after 5 epochs (PyTorch, two minutes on one core) where ``small``
  stalls near 0.984 (no hidden dense layer); without batch norm the same net needed 8 epochs for
  0.992.
- ``large``: conv 32 -> conv 64 -> dense 1024 -> dense 1024 -> dense. Its 5M dense weights must be
  streamed from memory once per call, so a single sample costs ~1.5 ms while a batch of 32 costs
  ~0.2 ms per sample (onnxruntime, 1 thread, 8x8): the model dynamic batching is measured on.

Inputs larger than 8x8 get extra 2x2 max-pools right after the first convolutions, until the side
after the architecture's own pools is 8 or less: 28x28 MNIST runs conv 16 at 28x28, pools to 14x14,
runs conv 32 there and pools to 7x7, so its second convolution costs a quarter of what it would at
full resolution (LeNet's order). Convs use 'same' padding, so 8x8 digits work. Every model ends
in a softmax: it outputs probabilities. The frameworks are imported inside the build functions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import keras
    import torch


class ArchSpec(NamedTuple):
    """One architecture: conv widths, which convs a 2x2 max-pool follows, hidden dense widths,
    and so on."""

    convs: tuple[int, ...]
    pools: tuple[int, ...]
    dense: tuple[int, ...]
    kernel: int = 3
    # after each conv, before its ReLU; exports fold in the running statistics
    batchnorm: bool = False
    dropout: float = 0.0  # before the output layer, in training only (exports see the identity)


ARCHS = ("small", "large", "lenet")
_SPECS: dict[str, ArchSpec] = {
    "small": ArchSpec((16, 32), (1,), ()),
    "large": ArchSpec((32, 64), (), (1024, 1024)),
    "lenet": ArchSpec((16, 32), (0, 1), (128,), kernel=5, batchnorm=True, dropout=0.25),
}
POOL_WHILE_SIDE_ABOVE = 8
POOL = 0  # in a layer plan: a 2x2 max-pool (other entries are conv widths)


def arch_spec(arch: str) -> ArchSpec:
    """The declaration of ``arch``; unknown names are refused with the list of known ones."""
    if arch not in _SPECS:
        raise ValueError(f"unknown arch {arch!r} (choose from {', '.join(ARCHS)})")
    return _SPECS[arch]


def layer_plan(arch: str, shape: tuple[int, int]) -> tuple[list[int], tuple[int, ...]]:
    """The conv/pool sequence (conv widths, ``POOL`` for a 2x2 max-pool) and the hidden dense
    widths."""
    convs, pools, dense = arch_spec(arch)[:3]
    side, extra_pools = min(shape) >> len(pools), 0
    while side > POOL_WHILE_SIDE_ABOVE:
        side, extra_pools = side // 2, extra_pools + 1
    plan: list[int] = []
    for index, filters in enumerate(convs):
        plan.append(filters)
        # downsample early: later convs run on smaller maps
        if extra_pools and index < len(convs) - 1:
            plan.append(POOL)
            extra_pools -= 1
        if index in pools:
            plan.append(POOL)
    return plan + [POOL] * extra_pools, dense


def build_keras(arch: str, shape: tuple[int, int], num_classes: int) -> keras.Model:
    """A Keras model taking (N, H, W, 1) float32 named "input" and returning probabilities."""
    import keras

    spec = arch_spec(arch)
    plan, dense = layer_plan(arch, shape)
    inputs = keras.Input(shape=(*shape, 1), name="input", dtype="float32")
    x = inputs
    for index, width in enumerate(plan):
        if width == POOL:
            x = keras.layers.MaxPooling2D(2, name=f"pool{index}")(x)
        else:
            if not spec.batchnorm:
                x = keras.layers.Conv2D(
                    width, spec.kernel, padding="same", activation="relu", name=f"conv{index}"
                )(x)
                continue
            x = keras.layers.Conv2D(width, spec.kernel, padding="same", name=f"conv{index}")(x)
            # PyTorch's defaults (momentum 0.1 there is 0.9 here), so both frameworks train the same
            # net
            x = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=f"norm{index}")(x)
            x = keras.layers.ReLU(name=f"relu{index}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    for index, units in enumerate(dense):
        x = keras.layers.Dense(units, activation="relu", name=f"dense{index}")(x)
    if spec.dropout:
        x = keras.layers.Dropout(spec.dropout, name="dropout")(x)
    x = keras.layers.Dense(num_classes, name="logits")(x)
    outputs = keras.layers.Softmax(name="probabilities")(x)
    return keras.Model(inputs, outputs, name=f"{arch}_cnn")


def build_torch(arch: str, shape: tuple[int, int], num_classes: int) -> torch.nn.Sequential:
    """A PyTorch ``Sequential`` taking (N, 1, H, W) float32 and returning probabilities.

    Its last layer is the softmax, so ``model[:-1]`` gives the logits to train with cross-entropy.
    """
    from torch import nn

    spec = arch_spec(arch)
    plan, dense = layer_plan(arch, shape)
    layers: list[nn.Module] = []
    channels, height, width = 1, shape[0], shape[1]
    for filters in plan:
        if filters == POOL:
            layers.append(nn.MaxPool2d(2))
            height, width = height // 2, width // 2
        else:
            layers.append(nn.Conv2d(channels, filters, spec.kernel, padding="same"))
            if spec.batchnorm:
                layers.append(nn.BatchNorm2d(filters))
            layers.append(nn.ReLU())
            channels = filters
    layers.append(nn.Flatten())
    features = channels * height * width
    for units in dense:
        layers += [nn.Linear(features, units), nn.ReLU()]
        features = units
    if spec.dropout:
        layers.append(nn.Dropout(spec.dropout))
    layers += [nn.Linear(features, num_classes), nn.Softmax(dim=1)]
    return nn.Sequential(*layers)
