"""What a worker serves: ``SERVING_MODELS`` parsed once (``Selection``), and one ``Planner`` for
start and change.

``SERVING_MODELS`` names what the v2 API serves beside the native API's model (``SERVING_MODEL``):
``*`` is every version of every model in the repository; ``name`` keeps the latest versions of that
model that ``SERVING_VERSION_POLICY`` allows (latest, latest:N or all); ``name:N`` pins version N;
``name:*`` every version of it. The same ``Planner`` decides at start (``strict``: a named model or
version that is absent, or any selected version that fails its checks, stops the start with one
line) and while serving (model control: a version that fails is left out with its reason, and the
next older one that passes takes its place, so a broken publish never replaces a working version).
Each version is checked (sha256 of every file, pins, backend fit) when its folder's listing changes,
and hashed again right before it is loaded.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from serving.config import Settings
from serving.errors import ModelLoadError, ModelNotFound, ServingError
from serving.runtime.admission import admit
from serving.store.repository import ModelMetadata, ModelRepository, list_versions

log = logging.getLogger("serving")
#: The native API's model when SERVING_MODEL is empty and several models are on disk: the first of
#: these that is there. ``python train.py`` trains mnist-torch (or, without MNIST, digits-tf and
#: digits-torch); ``--dataset mnist --framework all`` adds mnist-tf.
DEFAULT_MODELS = ("mnist-torch", "mnist-tf", "digits-tf")
DEFAULT_MODEL = DEFAULT_MODELS[0]
Key = tuple[str, int]
#: A version to serve and the backend that serves it.
Served = tuple[ModelMetadata, str]


@dataclass(frozen=True)
class Selection:
    """``SERVING_MODELS`` parsed: every model (``*``), names under the version policy, pinned
    versions."""

    every: bool = False
    names: tuple[str, ...] = ()
    #: name -> pinned version (None for ``name:*``, every version)
    pinned: Mapping[str, int | None] = field(default_factory=dict)
    #: every name in the order the setting gives them
    order: tuple[str, ...] = ()

    @classmethod
    def parse(cls, spec: str) -> Selection:
        every, names, pinned, order = False, [], {}, []
        for entry in (part.strip() for part in spec.split(",") if part.strip()):
            if entry == "*":
                every = True
                continue
            name, _, version = entry.partition(":")
            if version:
                pinned[name] = None if version == "*" else int(version)
            elif name not in names:
                names.append(name)
            if name not in order:
                order.append(name)
        return cls(every, tuple(names), pinned, tuple(order))


@dataclass(frozen=True)
class Plan:
    """What a worker should serve: every version with its backend, the default, and what was
    refused."""

    served: dict[Key, Served]
    default: Key
    failed: dict[Key, str]


def policy_count(policy: str) -> int | None:
    """How many latest versions a policy keeps: ``latest`` 1, ``latest:N`` N, ``all`` None (every
    one)."""
    if policy == "all":
        return None
    return int(policy.partition(":")[2] or 1)


class Planner:
    """Works out what should be served, checking each version when its files change."""

    def __init__(self, settings: Settings, repository: ModelRepository) -> None:
        self.settings, self.repository = settings, repository
        self.selection = Selection.parse(settings.models)
        #: Versions served whatever the selection and the policy say: those the traffic rules in
        #: force name (``serving.runtime.traffic``), replaced whole when the rules change.
        self.required: frozenset[Key] = frozenset()
        self._checked: dict[tuple[Key, int], Served | str] = {}

    def default_name(self) -> str:
        """The native API's model: SERVING_MODEL; else the first of ``DEFAULT_MODELS`` selected,
        else the first selected model; else the first of ``DEFAULT_MODELS`` on disk, else the only
        model on disk."""
        if self.settings.model:
            return self.settings.model
        listed = list(self.selection.order)
        if self.selection.every:
            listed += [name for name in self.repository.models() if name not in listed]
        if listed:
            return next((name for name in DEFAULT_MODELS if name in listed), listed[0])
        models = self.repository.models()
        if not models:
            raise ModelLoadError(
                f"no model in {self.repository.root}/: train one (`python train.py`), import one"
                " (`serving import`), or mount a model repository there"
            )
        preferred = next((name for name in DEFAULT_MODELS if name in models), None)
        if preferred is not None:
            return preferred
        if len(models) == 1:
            return models[0]
        raise ModelLoadError(
            f"{self.repository.root}/ holds several models ({', '.join(models)}) and none of"
            f" {', '.join(DEFAULT_MODELS)}: say which to serve, e.g."
            f" SERVING_MODEL={models[0]} gunicorn flask_server:app"
        )

    def check(self, name: str, version: int) -> Served | str:
        """(metadata, backend) for a version that passes its checks, else the reason it does not.

        Cached by the folder's listing (every file's name, size and modification time): a version
        copied in file by file, or a file replaced in place, is checked again as soon as anything
        in it changes. A cached pass only plans; ``verify`` hashes the files again before a load.
        """
        path = self.repository.root / name / str(version)
        key = ((name, version), _listing(path))
        if key not in self._checked:
            try:
                self._checked[key] = admit(self.repository.resolve(name, version), self.settings)
            except (ModelLoadError, ModelNotFound, ServingError) as exc:
                reason = self.reason(exc, name, version)
                self._checked[key] = reason
                log.warning("not serving %s:%d: %s", name, version, reason)
        return self._checked[key]

    def verify(self, name: str, version: int) -> Served:
        """The checks again, from the files' bytes, right before a load: a pinned digest
        (``SERVING_MODEL_SHA256``) and every recorded sha256 hold for what is loaded now, whatever
        was cached. ModelLoadError (or ConfigError) when they do not."""
        return admit(self.repository.resolve(name, version), self.settings)

    def reason(self, error: BaseException, name: str, version: int) -> str:
        """Why a version is not served, as answers may show it: the repository's path replaced by
        the version's name (a backend's own message may name the file it failed on)."""
        text = getattr(error, "message", None) or str(error) or error.__class__.__name__
        folder = self.repository.root / name / str(version)
        for path, shown in (
            (folder, f"{name}:{version}"),
            (self.repository.root, "the repository"),
        ):
            text = text.replace(str(path.resolve()), shown).replace(str(path), shown)
        return text

    def plan(
        self, only: list[str] | None = None, default: str | None = None, strict: bool = False
    ) -> Plan:
        """The versions to serve: the default model's (SERVING_MODEL_VERSION pins it), then the
        selection's.

        ``only``: the explicit mode's wanted models, in place of the selection's names (pins still
        apply).
        ``strict`` (at start): a named model or version that is absent, or a version that fails its
        checks, raises instead of being left out.
        """
        selection = self.selection
        default = default or self.default_name()
        names = (
            list(selection.names)
            if only is None
            else [name for name in only if name not in selection.pinned]
        )
        pinned = dict(selection.pinned)
        if selection.every and only is None:
            for name in self.repository.models():
                pinned.setdefault(name, None)
        if self.settings.model_version:
            pinned[default] = self.settings.model_version
            names = [name for name in names if name != default]
        elif default not in names and (self.settings.model or default not in pinned):
            names.insert(0, default)
        keep = policy_count(self.settings.version_policy)
        served: dict[Key, Served] = {}
        failed: dict[Key, str] = {}
        for name in [*names, *(name for name in pinned if name not in names)]:
            versions = list_versions(self.repository.root / name)
            picks: list[tuple[list[int], int | None]] = []
            if name in names:
                if strict:
                    self._present(name, None, versions)
                picks.append((sorted(versions, reverse=True), keep))
            if name in pinned:
                if strict:
                    self._present(name, pinned[name], versions)
                picks.append(
                    (
                        versions
                        if pinned[name] is None
                        else [v for v in versions if v == pinned[name]],
                        None,
                    )
                )
            for candidates, limit in picks:
                good = 0
                for version in candidates:
                    if limit is not None and good >= limit:
                        break
                    if (name, version) in served:
                        good += 1
                        continue
                    # at start a refusal is raised as it is (ModelLoadError or ConfigError): it
                    # stops the start
                    result = (
                        admit(self.repository.resolve(name, version), self.settings)
                        if strict
                        else self.check(name, version)
                    )
                    if isinstance(result, str):
                        failed[(name, version)] = result
                    else:
                        served[(name, version)] = result
                        good += 1
        for name, version in sorted(self.required - served.keys()):
            if strict and version not in list_versions(self.repository.root / name):
                raise ModelLoadError(
                    f"SERVING_TRAFFIC names {name}:{version}, which is not in the repository"
                )
            result = (
                admit(self.repository.resolve(name, version), self.settings)
                if strict
                else self.check(name, version)
            )
            if isinstance(result, str):
                failed[(name, version)] = result
            else:
                served[(name, version)] = result
        ours = sorted(key for key in served if key[0] == default)
        if not ours:
            raise ModelLoadError(
                f"no servable version of {default}: "
                + (
                    "; ".join(
                        f"{n}:{v}: {reason}" for (n, v), reason in failed.items() if n == default
                    )
                    or "none on disk"
                )
            )
        return Plan(dict(sorted(served.items())), ours[-1], failed)

    def _present(self, name: str, version: int | None, versions: list[int]) -> None:
        """At start: ModelLoadError, naming SERVING_MODELS when it named it, for an absent model
        or version."""
        if versions and (version is None or version in versions):
            return
        try:
            self.repository.resolve(name, version)
        except ModelNotFound as exc:
            message = exc.message
        else:
            return
        raise ModelLoadError(
            f"SERVING_MODELS: {message}" if name in self.selection.order else message
        )


def _listing(folder: Path) -> tuple[tuple[str, int, int], ...]:
    """Every file under a version folder with its size and modification time (no file is read)."""
    entries = []
    try:
        for path in sorted(folder.rglob("*")):
            info = path.stat()
            if not path.is_dir():
                entries.append(
                    (path.relative_to(folder).as_posix(), info.st_size, info.st_mtime_ns)
                )
    except OSError:  # removed while listed: the next plan sees what is left
        return (("", -1, -1),)
    return tuple(entries)
