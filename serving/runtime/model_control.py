"""Models that change while serving: version policies, polling, explicit load and unload.

# design: each worker owns its models, so each worker changes them itself. Its ``ModelWatcher``
# thread (``serving.runtime.watcher``) reconciles every ``SERVING_POLL_SECONDS`` (poll) or when the
# shared state changes (explicit),
# works out what should be served (``plan``), loads and warms what is new while the old versions
# keep answering, then swaps the service's model table in one assignment and retires what left it: a
# retired version first waits until no request holds it (in-flight calls and, in batched mode, its
# queue drain through its own model thread), then stops. A version that fails its checks or its load
# is logged once, reported in the index with its reason, and never replaces a working one.
#
# Workers agree because they read the same folder: in poll mode each polls the repository, so two
# workers disagree for at most one poll interval plus one load. In explicit mode the worker that
# gets ``POST /v2/repository/models/{name}/load`` writes the wanted set with a new generation number
# into a file every worker watches (``serving.runtime.control_files``), and answers once every
# live worker's acknowledgement file reports that generation (or with the workers that failed or did
# not answer in time). Versions per model follow ``SERVING_VERSION_POLICY``: latest, latest:N or
# all; ``SERVING_MODELS=name:N`` pins one version.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any

from serving.errors import ModelNotFound, ServingError
from serving.observability import metrics
from serving.runtime.control_files import ControlFiles, control_directory
from serving.runtime.loaded_model import LoadedModel
from serving.runtime.model_table import ModelTable
from serving.runtime.service import InferenceService
from serving.runtime.versions import Key, Plan
from serving.store.repository import list_versions, valid_name

log = logging.getLogger("serving")


class ControlError(ServingError):
    """A load or unload that did not take effect on every worker."""

    status_code = 500


class ModelControl:
    """One worker's model control: plans with the service's planner, loads what is new, swaps the
    table.

    Owns its state (the explicit mode's shared files, how many workers acknowledge a change); it
    changes what the service serves only through ``InferenceService.swap``.
    ``ModelControl.of(service)`` is the one instance per service.
    """

    _instances: weakref.WeakKeyDictionary[InferenceService, ModelControl] = (
        weakref.WeakKeyDictionary()
    )
    _instances_lock = threading.Lock()

    def __init__(self, service: InferenceService) -> None:
        self.service = service
        #: Workers of this server: a load or unload waits for each one's acknowledgement (set by the
        #: watcher).
        self.worker_count = 1
        self._files: ControlFiles | None = None

    @classmethod
    def of(cls, service: InferenceService) -> ModelControl:
        """The model control of ``service`` (made on first use)."""
        with cls._instances_lock:
            control = cls._instances.get(service)
            if control is None:
                control = cls._instances[service] = cls(service)
            return control

    @property
    def files(self) -> ControlFiles:
        """The explicit mode's shared state files (one directory per server, shared by its
        workers)."""
        if self._files is None:
            self._files = ControlFiles(control_directory())
        return self._files

    def reconcile(self, workers: int, names: list[str] | None = None) -> None:
        """Load what the plan adds, swap the model table in one assignment, then retire what left
        it.

        ``names``: the explicit mode's wanted models; else the settings' (poll mode). With
        ``SERVING_SWAP=unload_first`` a replaced version is retired before its successor loads.
        """
        service = self.service
        with service.load_lock:
            table = service.table
            if not table.loaded_here:
                return
            default_name = table.default[0] if table.default is not None else None
            plan = service.planner.plan(only=names, default=default_name)
            current = dict(table.models)
            added = [key for key in plan.served if key not in current]
            removed = [key for key in current if key not in plan.served]
            if not added and not removed:
                if dict(table.failed) != plan.failed:
                    service.swap(
                        ModelTable(
                            table.served, table.default, plan.failed, table.models, table.owner_pid
                        )
                    )
                return
            failed = dict(plan.failed)
            if service.settings.swap == "unload_first":
                self._switch(
                    plan,
                    {key: current[key] for key in current if key not in removed},
                    removed,
                    current,
                    failed,
                )
                current = dict(service.table.models)
                removed = []
            threads = service.settings.math_threads_for(workers)
            loaded: dict[Key, LoadedModel] = {}
            for key in added:
                try:
                    # from the bytes on disk now: a file swapped since the plan is refused here
                    meta, backend_name = service.planner.verify(*key)
                    plan.served[key] = (meta, backend_name)
                    loaded[key] = service.load_one(meta, backend_name, threads, workers)
                    metrics.MODEL_CHANGES.labels("load", "ok").inc()
                except Exception as exc:  # a version that cannot load never replaces a working one
                    reason = service.planner.reason(exc, *key)
                    failed[key] = reason
                    metrics.MODEL_CHANGES.labels("load", "failed").inc()
                    log.warning(
                        "cannot load %s:%d, still serving the others: %s", key[0], key[1], reason
                    )
            self._switch(
                plan,
                {**{key: current[key] for key in current if key not in removed}, **loaded},
                removed,
                current,
                failed,
            )

    def _switch(
        self,
        plan: Plan,
        models: dict[Key, LoadedModel],
        removed: list[Key],
        current: dict[Key, LoadedModel],
        failed: dict[Key, str],
    ) -> None:
        """Build the new table from what is loaded, assign it, then retire what left it."""
        service = self.service
        old = service.table
        served = {
            key: plan.served[key] if key in plan.served else old.served[key]
            for key in sorted(models)
        }
        ours = [key for key in served if old.default is not None and key[0] == old.default[0]]
        default = plan.default if plan.default in served else (ours[-1] if ours else old.default)
        service.swap(ModelTable(served, default, failed, models, old.owner_pid))
        log.info(
            "serving %s (default %s)",
            ", ".join(f"{n}:{v}" for n, v in served) or "nothing",
            service.default_label,
        )
        for key in removed:
            current[key].retire(service.settings.request_timeout_ms / 1000.0 + 1.0)
            metrics.MODEL_CHANGES.labels("unload", "ok").inc()
            metrics.MODEL_INFO.labels(
                key[0],
                str(key[1]),
                current[key].backend_name,
                current[key].meta.framework,
                service.settings.mode,
            ).set(0)

    # -- explicit control: the admin API
    # -------------------------------------------------------------
    def load_or_unload(self, name: str, load: bool, timeout_s: float) -> dict[str, Any]:
        """Change the wanted set on every worker and wait until all live workers have applied it."""
        service = self.service
        if service.settings.model_control != "explicit":
            raise ControlError(
                "model control is not explicit: set SERVING_MODEL_CONTROL=explicit to load and"
                " unload models through the API",
                400,
            )
        if not valid_name(name):  # before any path is built from it
            raise ModelNotFound(f"invalid model name {name[:80]!r}")
        if load and not list_versions(service.repository.root / name):
            raise ModelNotFound(f"no model {name!r} in the repository")
        files = self.files
        initial = sorted({key[0] for key in service.table.served})

        def change(names: list[str]) -> list[str]:
            if load:
                return names if name in names else [*names, name]
            return [n for n in names if n != name]

        if not load and name not in (files.read() or {"models": initial})["models"]:
            raise ModelNotFound(f"model {name!r} is not loaded")
        if not load and service.meta is not None and name == service.meta.name:
            raise ControlError(
                f"model {name} serves the native API (SERVING_MODEL) and stays loaded", 400
            )
        generation = files.update(change, initial)
        acks, behind = files.await_generation(generation, self.worker_count, timeout_s)
        states = [
            next((e for e in ack["index"] if e["name"] == name and e["state"] == "READY"), None)
            for ack in acks
        ]
        failed = [
            e
            for ack in acks
            for e in ack["index"]
            if e["name"] == name
            and e["state"] == "UNAVAILABLE"
            and e.get("reason")
            and not e["reason"].startswith("not ")
        ]
        if behind:
            raise ControlError(
                f"{behind} of {max(self.worker_count, len(acks))} workers did not apply the change"
                f" within {timeout_s:g}s"
            )
        if load and not all(states):
            reason = failed[0]["reason"] if failed else "not loaded"
            # the version on disk cannot be served: the request conflicts with the repository
            raise ControlError(
                f"model {name} could not be loaded on {states.count(None)} of {len(acks)}"
                f" workers: {reason}",
                409,
            )
        return {"name": name, "loaded": load, "workers": len(acks), "generation": generation}

    def every_worker_index(self, own: list[dict[str, str]], unserved: bool) -> list[dict[str, str]]:
        """The repository index as every live worker sees it: READY only where all are ready,
        else the state and reason of the workers that differ (``own`` answers alone until the
        workers have acknowledged)."""
        acks = self.files.acks()
        if not acks:
            return own
        seen: dict[tuple[str, str], list[dict[str, str]]] = {}
        for ack in acks:
            for entry in ack["index"]:
                seen.setdefault((entry["name"], entry["version"]), []).append(entry)
        merged = []
        for (name, version), entries in sorted(
            seen.items(), key=lambda item: (item[0][0], int(item[0][1]))
        ):
            states = {entry["state"] for entry in entries}
            if len(entries) == len(acks) and states == {"READY"}:
                merged.append({"name": name, "version": version, "state": "READY", "reason": ""})
                continue
            if (
                not unserved
                and not any(entry["state"] == "READY" for entry in entries)
                and all(entry.get("reason", "").startswith("not ") for entry in entries)
            ):
                continue  # an unselected version: operators only
            ready = sum(entry["state"] == "READY" for entry in entries)
            worst = next((e for e in entries if e["state"] == "UNAVAILABLE"), None) or next(
                (e for e in entries if e["state"] != "READY"), entries[0]
            )
            state = "UNAVAILABLE" if worst["state"] == "UNAVAILABLE" else "LOADING"
            merged.append(
                {
                    "name": name,
                    "version": version,
                    "state": state,
                    "reason": f"ready on {ready} of {len(acks)} workers;"
                    f" {worst.get('reason') or 'loading'}",
                }
            )
        return merged
