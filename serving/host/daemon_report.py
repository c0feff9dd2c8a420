"""``--daemon`` that says on the terminal whether the server started, and exits non-zero when not.

# design: gunicorn daemonizes (``gunicorn.util.daemonize``: fork, setsid, fork) before it loads
# the app or runs a hook, so ``gunicorn flask_server:application --daemon`` used to exit 0 at once
# and a server that then failed (no such app, a model that cannot load) said so only in its log.
# gunicorn has no hook before that point, so ``install`` wraps ``daemonize``: the starting process
# forks first and waits, and the child daemonizes as gunicorn does. A pipe joins them: its write end
# is inherited by the master and every worker. The master writes its pid and where its log goes
# (``on_starting``) or why it cannot start; the first worker that has loaded its models writes
# ``ready``. Until the master has opened its log, the daemon's stderr goes into the pipe too, so
# what gunicorn says before that ("Already running on PID ...") reaches the terminal. The waiting
# process prints one line and exits 0 on ``ready``; when every write end is closed without it (the
# master stopped), it prints why (what came through the pipe, else the error lines the log gained
# during this start), and exits 1; after ``limit_s`` it says the server is still starting, and
# exits 1 too (it is left running). A re-exec on SIGUSR2 (GUNICORN_FD set) does not fork.
"""

from __future__ import annotations

import os
import select
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: The write end in the daemon's processes (None in any other server).
_REPORT_FD: int | None = None
MAX_ERROR_LINES = 12
#: Log lines left out of the reason a start failed: routine lines and traceback bodies.
QUIET = (
    "] [INFO] ",
    "] [DEBUG] ",
    '"level": "info"',
    '"level": "debug"',
    "Traceback (",
    "During handling",
)
#: Starts the lines of the report itself (anything else in the pipe is the daemon's stderr).
MARK = "\x1eserving "


def install(limit_s: float, log_file: str = "") -> None:
    """Make gunicorn's daemonize report the start to the terminal (idempotent); ``log_file`` is
    where the server logs when it is set (SERVING_LOG_FILE), read when the master stops before it
    says where its log is."""
    import gunicorn.util

    original = gunicorn.util.daemonize
    if getattr(original, "reports_start", False):
        return

    def daemonize(enable_stdio_inheritance: bool = False) -> None:
        global _REPORT_FD
        if "GUNICORN_FD" in os.environ:  # a re-exec: gunicorn keeps its process, so do we
            original(enable_stdio_inheritance)
            return
        read_fd, write_fd = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        fallback = (log_file, os.path.getsize(log_file) if os.path.isfile(log_file) else 0)
        if os.fork() == 0:
            os.close(read_fd)
            _REPORT_FD = write_fd
            original(enable_stdio_inheritance)
            if not enable_stdio_inheritance:  # stderr to the terminal until the log takes it
                os.dup2(write_fd, 2)
            return
        os.close(write_fd)
        os._exit(wait_for_report(read_fd, limit_s, print_line, fallback))

    daemonize.reports_start = True  # type: ignore[attr-defined]
    gunicorn.util.daemonize = daemonize


def _write(line: str) -> None:
    global _REPORT_FD
    if _REPORT_FD is None:
        return
    try:
        os.write(_REPORT_FD, (MARK + line.replace("\n", " ") + "\n").encode())
    except OSError:  # the terminal's process is gone (it was told already, or it was killed)
        os.close(_REPORT_FD)
        _REPORT_FD = None


def master_started(server: Any) -> None:
    """Master, in on_starting: its pid and its log file (and where in it this start begins)."""
    log = str(server.cfg.errorlog or "-")
    offset = os.path.getsize(log) if log != "-" and os.path.isfile(log) else 0
    _write(f"pid {os.getpid()}")
    _write(f"log {offset} {log}")


def master_failed(reason: str) -> None:
    """Master: it cannot start (the reason also goes to its log)."""
    _write(f"error {reason}")


def worker_ready() -> None:
    """Worker, once its models are loaded: the server answers. The worker's copy of the pipe is
    closed (a worker started later writes into its own copy, inherited from the master, and
    nobody is reading any more: that write is dropped)."""
    global _REPORT_FD
    _write("ready")
    if _REPORT_FD is not None:
        os.close(_REPORT_FD)
        _REPORT_FD = None


def print_line(line: str, error: bool = False) -> None:
    print(line, file=sys.stderr if error else sys.stdout, flush=True)


def wait_for_report(
    read_fd: int,
    limit_s: float,
    say: Callable[..., None],
    fallback: tuple[str, int] = ("", 0),
) -> int:
    """The terminal's side: read the daemon's lines until ``ready``, the end, or ``limit_s``;
    returns the exit code. ``fallback`` is a log file and its size at the start, read when the
    master stops before it names its log."""
    pid, log, offset = "?", "-", 0
    errors: list[str] = []
    buffer = b""
    deadline = time.monotonic() + limit_s
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            say(
                f"error: the server (pid {pid}) has not finished starting after {limit_s:.0f} s;"
                f" it is still running: see {log}, and stop it with `serving stop` or"
                f" kill -TERM {pid}",
                error=True,
            )
            return 1
        readable, _, _ = select.select([read_fd], [], [], remaining)
        if not readable:
            continue
        chunk = os.read(read_fd, 4096)
        buffer += chunk
        while b"\n" in buffer:
            raw, _, buffer = buffer.partition(b"\n")
            text = raw.decode(errors="replace")
            if not text.startswith(MARK):  # the daemon's own stderr, before its log took it
                if text.strip():
                    errors.append(text.strip())
                continue
            kind, _, rest = text[len(MARK) :].partition(" ")
            if kind == "pid":
                pid = rest
            elif kind == "log":
                start, _, log = rest.partition(" ")
                offset = int(start) if start.isdigit() else 0
            elif kind == "error":
                errors.append(rest)
            elif kind == "ready":
                where = "" if log == "-" else f"; log: {log}"
                say(f"started in the background: gunicorn master pid {pid}{where}")
                return 0
        if not chunk:  # every write end closed: the master stopped before a worker was ready
            if log == "-" and fallback[0]:
                log, offset = fallback
            lines = errors or _error_lines(log, offset)
            say(f"error: the server stopped while starting (master pid {pid}):", error=True)
            for line in lines[-MAX_ERROR_LINES:]:
                say(f"  {line}", error=True)
            if log != "-":
                say(f"  (the whole log: {log})", error=True)
            return 1


def _error_lines(log: str, offset: int) -> list[str]:
    """The error lines the log gained since ``offset`` (text or JSON lines)."""
    if log == "-":
        return ["no log file: run it in the foreground (without --daemon) to see why"]
    try:
        with open(Path(log), "rb") as handle:
            handle.seek(offset)
            text = handle.read(1 << 20).decode(errors="replace")
    except OSError as exc:
        return [f"cannot read {log}: {exc.strerror}"]
    lines: list[str] = []
    for line in text.splitlines():
        quiet = any(tag in line for tag in QUIET) or line[:1].isspace()
        if line.strip() and not quiet and line not in lines:
            lines.append(line)
    return lines or text.splitlines()[-MAX_ERROR_LINES:] or ["the log says nothing"]
