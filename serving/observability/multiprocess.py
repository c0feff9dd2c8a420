"""The prometheus multiprocess directory, prepared by the master before prometheus_client is
imported.

prometheus_client picks its value storage when it is first imported, from
``PROMETHEUS_MULTIPROC_DIR``; so gunicorn.conf.py calls ``prepare_metrics_dir`` before importing
anything that imports it. This module must therefore not import prometheus_client (nor anything that
does).

The server deletes its metric files at each start, so it only ever deletes files it can tell are its
own: a directory given with ``SERVING_METRICS_DIR`` (or ``PROMETHEUS_MULTIPROC_DIR``) must be empty
the first time, and is then marked with a ``MARKER`` file; a directory that holds other files and no
marker is refused with one line (prometheus_client would also read any ``*.db`` file there as its
own). In a marked directory only prometheus_client's files (``counter_<pid>.db``,
``gauge_livesum_<pid>.db``, ...) and the workers' drift windows (``drift_<pid>.json``) are deleted.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import tempfile
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from serving.config import Settings
from serving.errors import ConfigError

TEMP_PREFIX = "serving-metrics-"
#: Marks a directory whose metric files belong to this server (written when it first takes an empty
#: one).
MARKER = ".serving-metrics"
#: prometheus_client's multiprocess file names: ``<type>[_<gauge mode>]_<pid>.db`` (values.py).
METRIC_FILE = re.compile(
    r"^(counter|histogram|summary|gauge_(live)?(all|min|max|sum|mostrecent))_\d+\.db$"
    r"|^drift_\d+\.(json|tmp)$"  # a worker's drift window (serving.observability.drift)
)


def prepare_metrics_dir(settings: Settings, environ: MutableMapping[str, str]) -> str:
    """Point prometheus_client's multiprocess mode at a directory (kept across reloads)."""
    directory = environ.get("PROMETHEUS_MULTIPROC_DIR") or settings.metrics_dir
    if not directory:
        directory = tempfile.mkdtemp(prefix=TEMP_PREFIX)
        owner = os.getpid()
        # Also removed when the master exits before gunicorn's on_exit hook (a failed start); forked
        # workers inherit atexit handlers, hence the pid check.
        atexit.register(
            lambda: os.getpid() == owner and shutil.rmtree(directory, ignore_errors=True)
        )
    claim(Path(directory))
    environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    return directory


def claim(directory: Path) -> None:
    """Make ``directory`` this server's metrics directory, or refuse one that holds other files."""
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / MARKER
    if marker.exists():
        return
    others = sorted(entry.name for entry in directory.iterdir())
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise ConfigError(
            f"the metrics directory {directory} holds files this server did not write ({shown}); "
            "it deletes"
            " its metric files there at each start, so give it an empty directory of its own"
            " (SERVING_METRICS_DIR), or leave SERVING_METRICS_DIR empty for a temporary one"
        )
    marker.write_text(
        "prometheus_client multiprocess files of the serving model server: its files here"
        " (counter_<pid>.db, gauge_*_<pid>.db, histogram_<pid>.db, ...) are deleted at each start\n"
    )


def wipe_metrics_dir(server: Any) -> None:
    """Master start: drop the metric files of a previous run, so counters start at zero; nothing
    else."""
    directory = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    for stale in directory.iterdir():
        if METRIC_FILE.match(stale.name):
            stale.unlink(missing_ok=True)
    server.log.info("metrics: prometheus multiprocess directory %s", directory)


def remove_metrics_dir() -> None:
    """Master exit: remove the metrics directory if it is a temporary one this server made."""
    directory = Path(os.environ.get("PROMETHEUS_MULTIPROC_DIR", ""))
    if directory.name.startswith(TEMP_PREFIX) and directory.parent == Path(tempfile.gettempdir()):
        shutil.rmtree(directory, ignore_errors=True)
