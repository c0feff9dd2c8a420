"""The state a server's workers share: what they should serve, with a generation number, and each
worker's acknowledgement of the generation it applied.

# design: one directory per server (``control/`` in its metrics directory), read by every worker's
# watcher four times a second. A change is made under an exclusive flock: read ``state.json``,
# change it, bump the generation, write a temporary file and rename it over the state, so a reader
# never sees half of it. The state holds the explicit mode's wanted models (``models``), the
# traffic rules in force (``traffic``: model -> rule text) and their recent events (``events``).
# Each watcher applies a new generation, then writes its own ack file (its pid, the generation, its
# model index and traffic windows); a change answers once every live worker's ack reports its
# generation (``await_generation``). A dead worker's ack is dropped when it is read.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from serving.observability.metrics import multiprocess_directory

State = dict[str, Any]


class ControlFiles:
    """The shared state and the workers' acknowledgements, in one directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        (directory / "acks").mkdir(parents=True, exist_ok=True)
        self.state = directory / "state.json"

    def read(self) -> State | None:
        try:
            value: State = orjson.loads(self.state.read_bytes())
            return value
        except (OSError, orjson.JSONDecodeError):
            return None

    def edit(self, change: Callable[[State], State | None], initial: State) -> int | None:
        """Apply ``change(state) -> state`` under the lock (``initial`` fills the keys the state
        lacks); returns the new generation, or None when ``change`` returned None (no change)."""
        with open(self.directory / "state.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = {"generation": 0, **initial, **(self.read() or {})}
            changed = change(dict(state))
            if changed is None:
                return None
            changed["generation"] = int(state["generation"]) + 1
            temporary = self.directory / f".state-{os.getpid()}.json"
            temporary.write_bytes(orjson.dumps(changed))
            os.replace(temporary, self.state)
            return int(changed["generation"])

    def update(self, change: Callable[[list[str]], list[str]], initial: list[str]) -> int:
        """Apply ``change(names) -> names`` to the wanted models; returns the new generation."""
        generation = self.edit(
            lambda state: {**state, "models": change(list(state["models"]))}, {"models": initial}
        )
        assert generation is not None
        return generation

    def ack(
        self,
        worker: str,
        generation: int,
        index: list[dict[str, str]],
        traffic: dict[str, Any] | None = None,
    ) -> None:
        path = self.directory / "acks" / f"{worker}.json"
        temporary = path.with_suffix(".tmp")
        entry: dict[str, Any] = {"pid": os.getpid(), "generation": generation, "index": index}
        if traffic:
            entry["traffic"] = traffic
        temporary.write_bytes(orjson.dumps(entry))
        os.replace(temporary, path)

    def acks(self) -> list[dict[str, Any]]:
        """The acknowledgements of live workers (a dead worker's file is dropped)."""
        found = []
        for path in (self.directory / "acks").glob("*.json"):
            try:
                entry = orjson.loads(path.read_bytes())
                os.kill(int(entry["pid"]), 0)
            except ProcessLookupError:
                path.unlink(missing_ok=True)
                continue
            except (OSError, orjson.JSONDecodeError, KeyError, ValueError):
                continue
            found.append(entry)
        return found

    def await_generation(
        self, generation: int, expected: int, timeout_s: float
    ) -> tuple[list[dict[str, Any]], int]:
        """Wait until ``expected`` live workers acknowledge ``generation`` (or ``timeout_s``
        passes); returns their acks and how many workers are behind (a worker that has not
        acknowledged anything yet counts as behind)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            acks = self.acks()
            if len(acks) >= expected and all(ack["generation"] >= generation for ack in acks):
                break
            time.sleep(0.05)
        acks = self.acks()
        behind = sum(ack["generation"] < generation for ack in acks) + max(0, expected - len(acks))
        return acks, behind


def control_directory() -> Path:
    """``control/`` in the server's metrics directory (shared by its workers), else a private
    one."""
    base = multiprocess_directory()
    return Path(base) / "control" if base else Path(tempfile.mkdtemp(prefix="serving-control-"))
