"""The prometheus multiprocess directory, prepared by the master before prometheus_client is imported.

prometheus_client picks its value storage when it is first imported, from ``PROMETHEUS_MULTIPROC_DIR``;
so gunicorn.conf.py calls ``prepare_metrics_dir`` before importing anything that imports it. This module
must therefore not import prometheus_client (nor anything that does).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from serving.config import Settings

TEMP_PREFIX = "serving-metrics-"


def prepare_metrics_dir(settings: Settings, environ: MutableMapping[str, str]) -> str:
    """Point prometheus_client's multiprocess mode at a directory (kept across reloads)."""
    directory = environ.get("PROMETHEUS_MULTIPROC_DIR") or settings.metrics_dir
    if not directory:
        directory = tempfile.mkdtemp(prefix=TEMP_PREFIX)
        owner = os.getpid()
        # Also removed when the master exits before gunicorn's on_exit hook (a failed start); forked
        # workers inherit atexit handlers, hence the pid check.
        atexit.register(lambda: os.getpid() == owner and shutil.rmtree(directory, ignore_errors=True))
    Path(directory).mkdir(parents=True, exist_ok=True)
    environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    return directory


def wipe_metrics_dir(server: Any) -> None:
    """Master start: drop the files of a previous run, so counters start at zero."""
    directory = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    for stale in directory.glob("*.db"):
        stale.unlink()
    server.log.info("metrics: prometheus multiprocess directory %s", directory)


def remove_metrics_dir() -> None:
    """Master exit: remove the metrics directory if it is a temporary one this server made."""
    directory = Path(os.environ.get("PROMETHEUS_MULTIPROC_DIR", ""))
    if directory.name.startswith(TEMP_PREFIX) and directory.parent == Path(tempfile.gettempdir()):
        shutil.rmtree(directory, ignore_errors=True)


