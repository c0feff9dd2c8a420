"""``serving stop``: stop a daemonized server by its pid file, and nothing else.

``kill $(cat run/server.pid)`` signals whatever process a stale pid file names: after a crash or a
reboot the number may belong to anything. ``stop`` first checks, from ``/proc``, that the pid names
a gunicorn master that was already running when the pid file was written, and refuses with one line
otherwise. Then it sends SIGTERM (a graceful stop: in-flight requests finish), waits for the process
to exit, and removes the pid file if gunicorn left it behind. Linux only (``/proc``); no dependency.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

DEFAULT_PID_FILE = Path("run/server.pid")
#: SERVING_GRACEFUL_TIMEOUT's default (30 s) plus the time to shut the master down.
DEFAULT_TIMEOUT_S = 45.0
#: Seconds between the process's start and a pid file it wrote, allowing for /proc's clock
#: granularity.
START_SLACK_S = 2.0
PROC = Path("/proc")


class Refused(Exception):
    """The pid file does not name a running gunicorn master: nothing was signalled."""


def stop(pid_file: Path, timeout: float = DEFAULT_TIMEOUT_S) -> int:
    """SIGTERM the gunicorn master ``pid_file`` names and wait for it to exit: 0 once it has,
    else 1."""
    try:
        pid = master_pid(pid_file)
    except Refused as exc:
        print(f"serving stop: {exc}", file=sys.stderr)
        return 1
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:  # exited between the check and the signal
        pass
    except PermissionError:
        print(
            f"serving stop: not allowed to signal process {pid}: run as the server's user",
            file=sys.stderr,
        )
        return 1
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            print(
                f"serving stop: the server (pid {pid}) is still running after {timeout:.0f}s "
                "(finishing"
                f" requests?); kill -KILL {pid} forces it",
                file=sys.stderr,
            )
            return 1
        time.sleep(0.1)
    _remove_if_naming(pid_file, pid)
    print(f"serving stop: stopped the server (pid {pid})")
    return 0


def master_pid(pid_file: Path) -> int:
    """The pid in ``pid_file`` once it is checked to be a gunicorn master; ``Refused`` says why
    not."""
    try:
        text = pid_file.read_text().strip()
    except FileNotFoundError:
        raise Refused(
            f"no pid file {pid_file}: is the server running (as a daemon, with --pid {pid_file})?"
        ) from None
    except OSError as exc:
        raise Refused(f"cannot read {pid_file}: {exc.strerror}") from None
    if not text.isdigit() or int(text) <= 1:
        raise Refused(f"{pid_file} does not hold a process id ({text[:40]!r}); nothing signalled")
    pid = int(text)
    if not (PROC / "self").exists():
        raise Refused("cannot check the process without /proc (Linux only); nothing signalled")
    if not _alive(pid):
        _remove_if_naming(pid_file, pid)
        raise Refused(
            f"no process {pid}: the server is not running; removed the stale pid file {pid_file}"
        )
    command = _command(pid)
    if "gunicorn" not in command:
        raise Refused(
            f"process {pid} ({command[:80] or 'unknown'}) is not gunicorn: {pid_file} is stale;"
            " nothing signalled"
        )
    # A worker is forked from its master without exec: the same command line (or a "worker" title).
    if "gunicorn: worker" in command or command == _command(_parent(pid)):
        raise Refused(
            f"process {pid} is a gunicorn worker, not the master: {pid_file} is stale; nothing "
            "signalled"
        )
    started = _started_at(pid)
    if started is not None and started > pid_file.stat().st_mtime + START_SLACK_S:
        raise Refused(
            f"process {pid} is a gunicorn master started after {pid_file} was written, so not the "
            "one"
            " that wrote it: the pid file is stale; nothing signalled"
        )
    return pid


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie, dead but not yet reaped, is not)."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _command(pid: int) -> str:
    """The command line of ``pid`` (its process title, when gunicorn set one with setproctitle)."""
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def _parent(pid: int) -> int:
    try:
        return int((PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _started_at(pid: int) -> float | None:
    """When ``pid`` started, in seconds since the epoch (from /proc/PID/stat and the boot time)."""
    try:
        ticks = int((PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(
            int(line.split()[1])
            for line in (PROC / "stat").read_text().splitlines()
            if line.startswith("btime ")
        )
    except (OSError, IndexError, ValueError, StopIteration):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def _remove_if_naming(pid_file: Path, pid: int) -> None:
    """Remove ``pid_file`` if it still names ``pid`` (a new server may have written its own
    meanwhile)."""
    try:
        if pid_file.read_text().strip() == str(pid):
            pid_file.unlink()
    except OSError:
        pass


def main(argv: list[str]) -> int:
    """``serving stop [--pid FILE] [--timeout S]``."""
    parser = argparse.ArgumentParser(prog="serving stop", description=stop.__doc__)
    parser.add_argument(
        "--pid", type=Path, default=DEFAULT_PID_FILE, help="the pid file gunicorn --pid wrote"
    )
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds to wait for the exit"
    )
    args = parser.parse_args(argv)
    return stop(args.pid, args.timeout)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
