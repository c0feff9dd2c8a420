"""Which versions of which models a worker should serve: the version policy, checked versions, a plan.

``SERVING_VERSION_POLICY`` keeps the latest, the latest N or all versions of each served model;
``SERVING_MODELS=name:N`` pins one version. A version is checked once (sha256 of every file, pins,
backend fit), cached by its metadata's mtime; one that fails is left out with its reason, and the
next older one that passes takes its place, so a broken publish never replaces a working version.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from serving.errors import ModelLoadError, ModelNotFound, ServingError
from serving.repository import ModelMetadata, list_versions

if TYPE_CHECKING:
    from serving.service import InferenceService, Key

log = logging.getLogger("serving")


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
