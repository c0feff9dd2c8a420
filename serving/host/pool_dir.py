"""The model pool's socket directory, made by the master before fork and inherited by every process.

Each pool process listens on ``<pid>.sock`` in it; HTTP workers connect to whichever are there. A
directory given with SERVING_POOL_DIR is used as it is (made 0700 if missing); otherwise each server
gets a fresh temporary one, removed when the master exits. Stale sockets of a previous run are
removed at start: only files named like the pool's own.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import tempfile
from collections.abc import MutableMapping
from pathlib import Path

from serving.config import Settings
from serving.errors import ConfigError

TEMP_PREFIX = "serving-pool-"
SOCKET = re.compile(r"^\d+\.sock$")


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
