"""The model pool's set-up in the master: how many processes ``auto`` means, and the directory of
their sockets, both decided before fork and inherited by every process through the environment.

``SERVING_MODEL_POOL=auto`` (the default) gives one pool process when a served model runs on
TensorFlow: its runtime costs each worker about 43 MB of private memory in process (measured in
docs/modes.md), and through the pool every worker costs about 12 MB and the pool batches them all.
Batched mode (which batches in each worker), model control (the pool serves the models fixed at
start) and SERVING_SHARE_MEMORY=false (every worker its own copy, the path of earlier versions) keep
the models in the workers.

Each pool process listens on ``<pid>.sock`` in it; HTTP workers connect to whichever are there. A
directory given with SERVING_POOL_DIR is used as it is (made 0700 if missing); otherwise each server
gets a fresh temporary one, removed when the master exits. Stale sockets of a previous run are
removed at start: only files named like the pool's own.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import re
import shutil
import tempfile
from collections.abc import MutableMapping
from pathlib import Path

from serving.backends import backend_class
from serving.config import Settings
from serving.errors import ConfigError, ModelLoadError, ServingError
from serving.runtime.service import InferenceService

TEMP_PREFIX = "serving-pool-"
SOCKET = re.compile(r"^\d+\.sock$")


def resolve_auto_pool(settings: Settings, environ: MutableMapping[str, str]) -> Settings:
    """The settings with ``auto`` replaced by a number of pool processes, exported to children."""
    if settings.model_pool != "auto":
        return settings
    processes = 0
    # process mode only: threaded and batched workers share one model between their own threads,
    # and the pool's extra hop cost threaded TensorFlow 5-6% of its requests/s
    # (reports/bench-2026-12-05-before-after.md)
    if settings.share_memory and settings.mode == "process" and settings.model_control == "none":
        service = InferenceService(settings)
        try:
            service.resolve()
        except (ServingError, ModelLoadError, ConfigError):  # the start-up check says what is wrong
            pass
        else:
            backends = {backend for _, backend in service.served.values()}
            if any(_framework(backend) == "tensorflow" for backend in backends):
                processes = 1
    environ["SERVING_MODEL_POOL"] = str(processes)
    return dataclasses.replace(settings, model_pool=str(processes))


def _framework(backend: str) -> str:
    try:
        return backend_class(backend).framework
    except ModelLoadError:  # an unknown backend: the start-up check refuses it
        return ""


def prepare_pool_dir(settings: Settings, environ: MutableMapping[str, str]) -> Path:
    """The directory of the pool's sockets, exported as SERVING_POOL_DIR to every child."""
    if settings.pool_dir:
        directory = Path(settings.pool_dir)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not directory.is_dir():
            raise ConfigError(f"SERVING_POOL_DIR={directory} is not a directory")
        for stale in directory.iterdir():
            if SOCKET.match(stale.name):
                stale.unlink(missing_ok=True)
    else:
        directory = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX))
        owner = os.getpid()
        # also when the master exits before gunicorn's on_exit (a failed start); forked processes
        # inherit atexit handlers, hence the pid check
        atexit.register(
            lambda: os.getpid() == owner and shutil.rmtree(directory, ignore_errors=True)
        )
    environ["SERVING_POOL_DIR"] = str(directory)
    return directory


def remove_pool_dir() -> None:
    """Master exit: remove the pool's directory if it is a temporary one this server made."""
    directory = Path(os.environ.get("SERVING_POOL_DIR", ""))
    if directory.name.startswith(TEMP_PREFIX) and directory.parent == Path(tempfile.gettempdir()):
        shutil.rmtree(directory, ignore_errors=True)
