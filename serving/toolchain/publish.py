"""Publishing a model version: the one place where a version's files are sealed and made visible.

Training (``serving.toolchain.training``) and import (``serving.toolchain.importer``) both build a
version in a hidden staging folder next to the versions (``stage``), then call ``publish``: it
records the sha256 of every file in the folder, writes ``metadata.json`` and renames the folder to
the version number, so a server scanning ``<root>/<name>/`` never sees half of a version. A file
every version should carry (a description of the training inputs, say) is written into the staging
folder before ``publish``, which then lists it with its digest like any other.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import orjson

from serving.store.repository import next_version, sha256_file


def write_json(path: Path, value: Any, indent: bool = True) -> None:
    """A JSON file as train.py and serving import write them (orjson, indented, a final newline)."""
    path.write_bytes(orjson.dumps(value, option=orjson.OPT_INDENT_2 if indent else None) + b"\n")


def stage(root: Path, name: str, prefix: str = ".staging-") -> Path:
    """A fresh hidden folder in ``<root>/<name>/`` to build a version in (private until
    published)."""
    model_dir = root / name
    model_dir.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=model_dir))


def digests(folder: Path) -> dict[str, dict[str, str]]:
    """The sha256 of every file under ``folder`` (subfolders too) but ``metadata.json``, by
    relative path."""
    return {
        path.relative_to(folder).as_posix(): {"sha256": sha256_file(path)}
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path != folder / "metadata.json"
    }


def publish(
    staging: Path, root: Path, name: str, metadata: dict[str, Any], version: int | None = None
) -> int:
    """Seal ``staging`` as a version of ``name``: ``metadata`` plus its ``version`` and the digest
    of every file goes to ``metadata.json``, then the folder is renamed into place.

    Without ``version`` it takes the next free number, and the one after when another run took
    that first; a given ``version`` that exists raises ``FileExistsError`` (never overwritten).
    Returns the version published.
    """
    chosen = version or next_version(root, name)
    while True:
        target = root / name / str(chosen)
        sealed = {**metadata, "version": chosen, "artifacts": digests(staging)}
        write_json(staging / "metadata.json", sealed)
        staging.chmod(0o755)  # mkdtemp made it private; servers may run as another user
        if target.exists():
            if version is not None:
                raise FileExistsError(target)
            chosen = max(chosen + 1, next_version(root, name))
            continue
        try:
            os.rename(staging, target)
        except OSError:
            # another run took this version between the check and the rename: take the next one
            if version is None and target.exists():
                chosen = max(chosen + 1, next_version(root, name))
                continue
            raise
        return chosen
