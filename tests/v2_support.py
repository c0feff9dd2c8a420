"""Helpers shared by the v2, repository and OpenAPI tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import orjson


def add_version(repo: Path, name: str, version: int, source: int = 1) -> Path:
    """Copy ``name/source`` to ``name/version`` (same weights) with its metadata.json saying so."""
    target = repo / name / str(version)
    shutil.copytree(repo / name / str(source), target)
    meta = orjson.loads((target / "metadata.json").read_bytes())
    meta["version"] = version
    (target / "metadata.json").write_bytes(orjson.dumps(meta))
    return target


def multi_repo(model_repo: Path, target: Path) -> Path:
    """A copy of the session repository with digits-tf/1, digits-torch/1 and digits-torch/2."""
    shutil.copytree(model_repo, target)
    add_version(target, "digits-torch", 2)
    return target
