"""Network definitions shared by ``train.py`` and the tests, in Keras and PyTorch.

Two architectures, the same in both frameworks:

- ``small``: conv 16 -> conv 32 -> max-pool -> dense: reaches >= 0.95 on digits in seconds.
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

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import keras
    import torch

ARCHS = ("small", "large")
# arch -> (conv widths, conv indices followed by a 2x2 max-pool, hidden dense widths)
_SPECS: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {
    "small": ((16, 32), (1,), ()),
    "large": ((32, 64), (), (1024, 1024)),
}
POOL_WHILE_SIDE_ABOVE = 8
POOL = 0  # in a layer plan: a 2x2 max-pool (other entries are conv widths)


def layer_plan(arch: str, shape: tuple[int, int]) -> tuple[list[int], tuple[int, ...]]:
    """The conv/pool sequence (conv widths, ``POOL`` for a 2x2 max-pool) and the hidden dense widths."""
    if arch not in _SPECS:
        raise ValueError(f"unknown arch {arch!r} (choose from {', '.join(ARCHS)})")
    convs, pools, dense = _SPECS[arch]
    side, extra_pools = min(shape) >> len(pools), 0
    while side > POOL_WHILE_SIDE_ABOVE:
        side, extra_pools = side // 2, extra_pools + 1
    plan: list[int] = []
    for index, filters in enumerate(convs):
        plan.append(filters)
        if extra_pools and index < len(convs) - 1:  # downsample early: later convs run on smaller maps
            plan.append(POOL)
            extra_pools -= 1
        if index in pools:
            plan.append(POOL)
    return plan + [POOL] * extra_pools, dense


def build_keras(arch: str, shape: tuple[int, int], num_classes: int) -> keras.Model:
    """A Keras model taking (N, H, W, 1) float32 named "input" and returning probabilities."""
    import keras

    plan, dense = layer_plan(arch, shape)
    inputs = keras.Input(shape=(*shape, 1), name="input", dtype="float32")
    x = inputs
    for index, width in enumerate(plan):
        if width == POOL:
            x = keras.layers.MaxPooling2D(2, name=f"pool{index}")(x)
        else:
            x = keras.layers.Conv2D(width, 3, padding="same", activation="relu", name=f"conv{index}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    for index, units in enumerate(dense):
        x = keras.layers.Dense(units, activation="relu", name=f"dense{index}")(x)
    x = keras.layers.Dense(num_classes, name="logits")(x)
    outputs = keras.layers.Softmax(name="probabilities")(x)
    return keras.Model(inputs, outputs, name=f"{arch}_cnn")


def build_torch(arch: str, shape: tuple[int, int], num_classes: int) -> torch.nn.Sequential:
    """A PyTorch ``Sequential`` taking (N, 1, H, W) float32 and returning probabilities.

    Its last layer is the softmax, so ``model[:-1]`` gives the logits to train with cross-entropy.
    """
    from torch import nn

    plan, dense = layer_plan(arch, shape)
    layers: list[nn.Module] = []
    channels, height, width = 1, shape[0], shape[1]
    for filters in plan:
        if filters == POOL:
            layers.append(nn.MaxPool2d(2))
            height, width = height // 2, width // 2
        else:
            layers += [nn.Conv2d(channels, filters, 3, padding="same"), nn.ReLU()]
            channels = filters
    layers.append(nn.Flatten())
    features = channels * height * width
    for units in dense:
        layers += [nn.Linear(features, units), nn.ReLU()]
        features = units
    layers += [nn.Linear(features, num_classes), nn.Softmax(dim=1)]
    return nn.Sequential(*layers)
