"""Models that change while serving: version policies, polling, explicit load and unload.

# design: each worker owns its models, so each worker changes them itself. A ``ModelWatcher``
# thread per worker wakes every ``SERVING_POLL_SECONDS`` (poll) or every quarter second (explicit),
# works out what should be served (``plan``), loads and warms what is new while the old versions keep
# answering, then swaps the service's model table in one assignment and retires what left it: a
# retired version first waits until no request holds it (in-flight calls and, in batched mode, its
# queue drain through its own model thread), then stops. A version that fails its checks or its
# load is logged once, reported in the index with its reason, and never replaces a working one.
#
# Workers agree because they read the same folder: in poll mode each polls the repository, so two
# workers disagree for at most one poll interval plus one load. In explicit mode the worker that gets
# ``POST /v2/repository/models/{name}/load`` writes the wanted set with a new generation number into
# a file every worker watches (``<metrics dir>/control/state.json``), and answers once every live
# worker's acknowledgement file reports that generation (or with the workers that failed or did not
# answer in time). Versions per model follow ``SERVING_VERSION_POLICY``: latest, latest:N or all;
# ``SERVING_MODELS=name:N`` pins one version.
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from serving.errors import ModelLoadError, ModelNotFound, ServingError
from serving.repository import ModelMetadata, list_versions

if TYPE_CHECKING:
    from serving.service import InferenceService, Key

log = logging.getLogger("serving")
EXPLICIT_TICK_S = 0.25


class ControlError(ServingError):
    """A load or unload that did not take effect on every worker."""

    status_code = 500


@dataclass(frozen=True)
class Plan:
    """What a worker should serve: every version with its backend, the default, and what was refused."""

    served: dict[Key, tuple[ModelMetadata, str]]
    default: Key
    failed: dict[Key, str]


def policy_count(policy: str) -> int | None:
    """How many latest versions a policy keeps: ``latest`` 1, ``latest:N`` N, ``all`` None (every one)."""
    if policy == "all":
        return None
    return int(policy.partition(":")[2] or 1)


def wanted_names(service: InferenceService) -> tuple[list[str], dict[str, int | None]]:
    """Model names under the version policy, and pinned versions (``name:N``; None for ``name:*``)."""
    settings = service.settings
    names: list[str] = []
    pinned: dict[str, int | None] = {}
    for entry in (part.strip() for part in settings.models.split(",") if part.strip()):
        if entry == "*":
            names += [name for name in service.repository.models() if name not in names]
            continue
        name, _, version = entry.partition(":")
        if version:
            pinned[name] = None if version == "*" else int(version)
        elif name not in names:
            names.append(name)
    default = settings.model or service.default_name(list(pinned.items()))
    if settings.model_version:
        pinned[default] = settings.model_version
    elif default not in names and default not in pinned:
        names.insert(0, default)
    return names, pinned


class Planner:
    """Works out what should be served, checking each version once (cached by its metadata's mtime)."""

    def __init__(self, service: InferenceService) -> None:
        self.service = service
        self._checked: dict[tuple[Key, int], tuple[ModelMetadata, str] | str] = {}

    def check(self, name: str, version: int) -> tuple[ModelMetadata, str] | str:
        """(metadata, backend) for a version that passes its checks, else the reason it does not."""
        path = self.service.repository.root / name / str(version)
        try:
            stamp = (path / "metadata.json").stat().st_mtime_ns
        except OSError:
            stamp = 0
        key = ((name, version), stamp)
        if key not in self._checked:
            try:
                self._checked[key] = self.service.check(self.service.repository.resolve(name, version))
            except (ModelLoadError, ModelNotFound, ServingError) as exc:
                reason = getattr(exc, "message", None) or str(exc)
                self._checked[key] = reason
                log.warning("not serving %s:%d: %s", name, version, reason)
        return self._checked[key]

    def plan(self, names: list[str], pinned: dict[str, int | None], default: str) -> Plan:
        """The latest versions allowed by the policy that pass their checks; pinned versions as pinned."""
        keep = policy_count(self.service.settings.version_policy)
        served: dict[Key, tuple[ModelMetadata, str]] = {}
        failed: dict[Key, str] = {}
        root = self.service.repository.root
        for name in [*names, *pinned]:
            versions = list_versions(root / name)
            if name in pinned:
                candidates = versions if pinned[name] is None else [v for v in versions if v == pinned[name]]
                limit = None
            else:
                candidates, limit = sorted(versions, reverse=True), keep
            good = 0
            for version in candidates:
                if limit is not None and good >= limit:
                    break
                result = self.check(name, version)
                if isinstance(result, str):
                    failed[(name, version)] = result
                else:
                    served[(name, version)] = result
                    good += 1
        ours = sorted(key for key in served if key[0] == default)
        if not ours:
            raise ModelLoadError(f"no servable version of {default}: " + "; ".join(
                f"{n}:{v}: {reason}" for (n, v), reason in failed.items() if n == default) or "none on disk")
        return Plan(dict(sorted(served.items())), ours[-1], failed)


class ControlFiles:
    """The explicit mode's shared state: the wanted model names with a generation, and each worker's ack."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        (directory / "acks").mkdir(parents=True, exist_ok=True)
        self.state = directory / "state.json"

    def read(self) -> dict[str, Any] | None:
        try:
            value: dict[str, Any] = orjson.loads(self.state.read_bytes())
            return value
        except (OSError, orjson.JSONDecodeError):
            return None

    def update(self, change: Any, initial: list[str]) -> int:
        """Apply ``change(names) -> names`` under a lock; returns the new generation."""
        with open(self.directory / "state.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = self.read() or {"generation": 0, "models": initial}
            state = {"generation": state["generation"] + 1, "models": change(list(state["models"]))}
            temporary = self.directory / f".state-{os.getpid()}.json"
            temporary.write_bytes(orjson.dumps(state))
            os.replace(temporary, self.state)
            return int(state["generation"])

    def ack(self, worker: str, generation: int, index: list[dict[str, str]]) -> None:
        path = self.directory / "acks" / f"{worker}.json"
        temporary = path.with_suffix(".tmp")
        temporary.write_bytes(orjson.dumps({"pid": os.getpid(), "generation": generation, "index": index}))
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


def control_directory() -> Path:
    """``control/`` in the server's metrics directory (shared by its workers), else a private one."""
    base = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return Path(base) / "control" if base else Path(tempfile.mkdtemp(prefix="serving-control-"))


class ModelWatcher(threading.Thread):
    """Keeps one worker's models in line with the repository (poll) or the shared state (explicit)."""

    def __init__(self, service: InferenceService, workers: int) -> None:
        super().__init__(name="model-watcher", daemon=True)
        self.service, self.workers = service, workers
        self.stopping = threading.Event()
        self.generation = -1

    def run(self) -> None:
        settings = self.service.settings
        interval = settings.poll_seconds if settings.model_control == "poll" else EXPLICIT_TICK_S
        while not self.stopping.wait(interval):
            try:
                self.tick()
            except Exception:  # never let the thread die: the next tick retries
                log.exception("model control failed; the models served are unchanged")

    def tick(self) -> None:
        service = self.service
        if service.settings.model_control == "poll":
            service.reconcile(self.workers)
            return
        files = service.control_files()
        state = files.read()
        generation = state["generation"] if state else 0
        if generation != self.generation:
            if state is not None:
                service.reconcile(self.workers, names=list(state["models"]))
            self.generation = generation
        files.ack(str(os.getpid()), generation, service.index(unserved=True))


def load_or_unload(service: InferenceService, name: str, load: bool, timeout_s: float) -> dict[str, Any]:
    """Change the wanted set on every worker and wait until all live workers have applied it."""
    if service.settings.model_control != "explicit":
        raise ControlError("model control is not explicit: set SERVING_MODEL_CONTROL=explicit to load and unload"
                           " models through the API", 400)
    if load and not list_versions(service.repository.root / name):
        raise ModelNotFound(f"no model {name!r} in the repository")
    files = service.control_files()
    initial = sorted({key[0] for key in service.served})

    def change(names: list[str]) -> list[str]:
        if load:
            return names if name in names else [*names, name]
        return [n for n in names if n != name]

    if not load and name not in (files.read() or {"models": initial})["models"]:
        raise ModelNotFound(f"model {name!r} is not loaded")
    if not load and service.meta is not None and name == service.meta.name:
        raise ControlError(f"model {name} serves the native API (SERVING_MODEL) and stays loaded", 400)
    generation = files.update(change, initial)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        acks = files.acks()
        if acks and all(ack["generation"] >= generation for ack in acks):
            break
        time.sleep(0.05)
    acks = files.acks()
    behind = [ack["pid"] for ack in acks if ack["generation"] < generation]
    states = [next((e for e in ack["index"] if e["name"] == name and e["state"] == "READY"), None) for ack in acks]
    failed = [e for ack in acks for e in ack["index"] if e["name"] == name and e["state"] == "UNAVAILABLE"
              and e.get("reason") and not e["reason"].startswith("not ")]
    if behind:
        raise ControlError(f"{len(behind)} of {len(acks)} workers did not apply the change within {timeout_s:g}s")
    if load and not all(states):
        reason = failed[0]["reason"] if failed else "not loaded"
        raise ControlError(f"model {name} could not be loaded on {states.count(None)} of {len(acks)} workers:"
                           f" {reason}")
    return {"name": name, "loaded": load, "workers": len(acks), "generation": generation}
