"""``ModelTable``: what one worker serves, as one frozen value that model control swaps in one
assignment.

# design: a request reads ``service.table`` once and uses only that reference: the served versions,
# the default, and the loaded models always belong to the same moment. A version switch builds a new
# table (the new versions loaded and warmed first) and assigns it; a request that took the old table
# keeps the old version, which is retired only once no request holds it. So no request can see the
# new default with the old models, or be told that a version still served is "being unloaded".
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from serving.errors import ModelNotFound
from serving.runtime.loaded_model import LoadedModel
from serving.runtime.versions import Key, Served
from serving.store.repository import ModelMetadata

_EMPTY: Mapping = MappingProxyType({})


@dataclass(frozen=True, eq=False)  # compared by identity: a new table is a new moment
class ModelTable:
    """The versions a worker serves (sorted), the native API's default, the refused ones, and the
    loaded models (empty until this process loaded them: ``owner_pid`` is the process that did)."""

    served: Mapping[Key, Served] = field(default_factory=lambda: _EMPTY)
    default: Key | None = None
    failed: Mapping[Key, str] = field(default_factory=lambda: _EMPTY)
    models: Mapping[Key, LoadedModel] = field(default_factory=lambda: _EMPTY)
    owner_pid: int = 0

    @property
    def meta(self) -> ModelMetadata | None:
        """The default model's metadata (None until the table is planned)."""
        return self.served[self.default][0] if self.default is not None else None

    @property
    def backend_name(self) -> str:
        return self.served[self.default][1] if self.default is not None else ""

    @property
    def loaded_here(self) -> bool:
        """Whether this process loaded the models (a forked child inherits a table it cannot
        use)."""
        return bool(self.models) and self.owner_pid == os.getpid()

    def versions(self, name: str) -> list[int]:
        """The served versions of ``name``, ascending."""
        return [version for model, version in self.served if model == name]

    def key(self, name: str, version: int | None = None) -> Key:
        """The served (name, version) a request addresses (latest served when ``version`` is
        None)."""
        versions = self.versions(name)
        if not versions:
            served = ", ".join(sorted({n for n, _ in self.served})) or "none"
            raise ModelNotFound(f"no model {name!r} is served here (models: {served})")
        if version is None:
            return name, versions[-1]
        if version not in versions:
            raise ModelNotFound(
                f"model {name!r} has no version {version} served here (versions: {versions})"
            )
        return name, version

    @property
    def default_label(self) -> str:
        """The default model as logs label it, ``name:version`` ("-" until it is planned)."""
        return f"{self.default[0]}:{self.default[1]}" if self.default is not None else "-"


EMPTY_TABLE = ModelTable()
