"""Network layouts: 8x8 digits keep their layers; larger inputs pool early (LeNet's order)."""

from __future__ import annotations

import pytest

from serving.nets import POOL, layer_plan


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
