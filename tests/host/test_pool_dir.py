"""SERVING_MODEL_POOL=auto: one pool process for TensorFlow models, decided once in the master and exported."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.config import Settings
from serving.errors import ConfigError
from serving.host.pool_dir import resolve_auto_pool


@pytest.mark.parametrize(
    ("settings", "processes"),
    [
        ({"model": "digits-tf"}, 1),  # TensorFlow: the pool
        ({"model": "digits-tf", "mode": "threaded"}, 0),  # its threads share the worker's one model
        ({"model": "digits-torch"}, 0),  # TorchScript and ONNX Runtime share across fork instead
        ({"model": "digits-tf", "backend": "onnx"}, 0),
        ({"model": "digits-torch", "models": "digits-tf"}, 1),  # one TensorFlow model among them is enough
        ({"model": "digits-tf", "mode": "batched"}, 0),  # batched mode batches in each worker
        ({"model": "digits-tf", "mode": "threaded", "model_pool": "1"}, 1),  # asked for: kept
        ({"model": "digits-tf", "model_control": "poll"}, 0),  # the pool serves the models fixed at start
        ({"model": "digits-tf", "share_memory": False}, 0),  # every worker its own copy, as before
        ({"model": "digits-tf", "model_pool": "0"}, 0),  # an explicit number is kept
        ({"model": "digits-torch", "model_pool": "3"}, 3),
        ({"model": "no-such-model"}, 0),  # the start-up check refuses it, with its own message
    ],
)
def test_auto_is_one_pool_process_for_tensorflow(model_repo: Path, settings: dict[str, str], processes: int) -> None:
    environ: dict[str, str] = {}
    resolved = resolve_auto_pool(Settings(model_repository=model_repo, **settings), environ)
    assert resolved.pool_processes == processes
    if settings.get("model_pool", "auto") == "auto":
        assert environ == {"SERVING_MODEL_POOL": str(processes)}  # every child reads the same number
    else:
        assert environ == {}


def test_auto_is_no_pool_in_process() -> None:
    assert Settings().model_pool == "auto" and Settings().pool_processes == 0
    assert Settings.from_env({"SERVING_MODEL_POOL": "4"}).pool_processes == 4
    for wrong in ("-1", "65", "many", "1.5"):
        with pytest.raises(ConfigError, match="SERVING_MODEL_POOL"):
            Settings.from_env({"SERVING_MODEL_POOL": wrong})
