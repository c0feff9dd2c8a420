"""Network definitions shared by ``train.py`` and the tests, in Keras and PyTorch.

Two architectures, the same in both frameworks:

- ``small``: conv 16 -> conv 32 -> max-pool -> dense: reaches >= 0.95 on digits in seconds.
- ``large``: conv 32 -> conv 64 -> dense 1024 -> dense 1024 -> dense. Its 5M dense weights must be
  streamed from memory once per call, so a single sample costs ~1.5 ms while a batch of 32 costs
  ~0.2 ms per sample (onnxruntime, 1 thread, 8x8): the model dynamic batching is measured on.

Inputs larger than 8x8 are max-pooled after the convolutions until a side is 8 or less, so
28x28 MNIST stays cheap (7x7 features). Convs use 'same' padding, so 8x8 digits work. Every model ends
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


def _spec(arch: str, shape: tuple[int, int]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], int]:
    """Conv widths, pooled conv indices, hidden dense widths, and how many 2x2 pools follow the convs."""
    if arch not in _SPECS:
        raise ValueError(f"unknown arch {arch!r} (choose from {', '.join(ARCHS)})")
    convs, pools, dense = _SPECS[arch]
    side, extra_pools = min(shape) >> len(pools), 0
    while side > POOL_WHILE_SIDE_ABOVE:
        side, extra_pools = side // 2, extra_pools + 1
    return convs, pools, dense, extra_pools


def build_keras(arch: str, shape: tuple[int, int], num_classes: int) -> keras.Model:
    """A Keras model taking (N, H, W, 1) float32 named "input" and returning probabilities."""
    import keras

    convs, pools, dense, extra_pools = _spec(arch, shape)
    inputs = keras.Input(shape=(*shape, 1), name="input", dtype="float32")
    x = inputs
    for index, filters in enumerate(convs):
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"conv{index}")(x)
        if index in pools:
            x = keras.layers.MaxPooling2D(2, name=f"pool{index}")(x)
    for index in range(extra_pools):
        x = keras.layers.MaxPooling2D(2, name=f"pool_extra{index}")(x)
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

    convs, pools, dense, extra_pools = _spec(arch, shape)
    layers: list[nn.Module] = []
    channels, height, width = 1, shape[0], shape[1]
    for index, filters in enumerate(convs):
        layers += [nn.Conv2d(channels, filters, 3, padding="same"), nn.ReLU()]
        channels = filters
        if index in pools:
            layers.append(nn.MaxPool2d(2))
            height, width = height // 2, width // 2
    for _ in range(extra_pools):
        layers.append(nn.MaxPool2d(2))
        height, width = height // 2, width // 2
    layers.append(nn.Flatten())
    features = channels * height * width
    for units in dense:
        layers += [nn.Linear(features, units), nn.ReLU()]
        features = units
    layers += [nn.Linear(features, num_classes), nn.Softmax(dim=1)]
    return nn.Sequential(*layers)
