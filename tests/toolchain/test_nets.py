"""Network layouts: 8x8 digits keep their layers; larger inputs pool early (LeNet's order)."""

from __future__ import annotations

import pytest

from serving.toolchain.nets import POOL, layer_plan


@pytest.mark.parametrize(("arch", "shape", "plan"), [
    ("small", (8, 8), [16, 32, POOL]),  # conv 16 -> conv 32 -> pool: unchanged for the bundled digits
    ("large", (8, 8), [32, 64]),
    ("small", (28, 28), [16, POOL, 32, POOL]),  # conv 32 runs at 14x14, features end at 7x7
    ("large", (28, 28), [32, POOL, 64, POOL]),
    ("small", (64, 64), [16, POOL, 32, POOL, POOL]),  # more pools than convs: the rest at the end
])
def test_layer_plans(arch: str, shape: tuple[int, int], plan: list[int]) -> None:
    assert layer_plan(arch, shape)[0] == plan


def test_features_end_at_most_8_wide() -> None:
    for arch in ("small", "large"):
        for side in (8, 12, 16, 28, 32, 64, 100):
            plan, _ = layer_plan(arch, (side, side))
            final = side
            for step in plan:
                final = final // 2 if step == POOL else final
            assert 1 <= final <= 8, (arch, side, plan)


def test_unknown_arch_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown arch"):
        layer_plan("huge", (8, 8))


def test_lenet_plan_and_parts() -> None:
    """MNIST's default: conv 5x5 16 -> pool -> conv 5x5 32 -> pool, batch norm after each conv, dropout."""
    import torch
    from torch import nn

    from serving.toolchain.nets import arch_spec, build_torch

    assert layer_plan("lenet", (28, 28)) == ([16, POOL, 32, POOL], (128,))
    model = build_torch("lenet", (28, 28), 10)
    kinds = [type(layer).__name__ for layer in model]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d", "Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d",
                     "Flatten", "Linear", "ReLU", "Dropout", "Linear", "Softmax"]
    assert isinstance(model[0], nn.Conv2d) and model[0].kernel_size == (arch_spec("lenet").kernel,) * 2 == (5, 5)
    model.eval()
    with torch.inference_mode():
        probabilities = model(torch.rand(3, 1, 28, 28))
    assert probabilities.shape == (3, 10)
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(3))
    # the digits archs keep their layers: no batch norm, no dropout
    assert "BatchNorm2d" not in [type(layer).__name__ for layer in build_torch("small", (8, 8), 10)]
