"""The model table is one value swapped in one assignment: readers never see half a switch.

Many threads read the served table and call the default model, by name and by version, while model control
publishes and switches to a new version again and again (each switch loads and warms the new version, swaps
the table, and retires the old one once no request holds it). No read may be told that a version still served
is being unloaded, and every table a reader takes holds the models of exactly the versions it serves.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from serving.config import Settings
from serving.errors import ServingError
from serving.runtime.model_control import ModelControl
from serving.runtime.model_table import ModelTable
from serving.runtime.service import InferenceService
from serving.toolchain.data import load_digits_dataset
from tests.runtime.test_model_control import publish

X = load_digits_dataset(seed=0).x_test[:2].astype(np.float32)
SWAPS = 20
READERS = 8


def test_the_table_is_immutable() -> None:
    table = ModelTable()
    with pytest.raises(AttributeError):
        table.default = ("x", 1)  # type: ignore[misc]


@pytest.mark.slow
def test_reads_across_many_swaps_never_see_a_served_version_being_unloaded(repo_copy: Path) -> None:
    settings = Settings.from_env({}, model_repository=repo_copy, model="digits-torch", backend="onnx", workers=1,
                                 model_control="poll")
    service = InferenceService(settings)
    service.load(workers=1)
    control = ModelControl.of(service)
    stop = threading.Event()
    failures: list[str] = []
    seen: set[int] = set()
    reads = [0] * READERS

    def read(slot: int) -> None:
        while not stop.is_set():
            try:
                table = service.table
                assert table.default is not None and set(table.models) == set(table.served), "a torn table"
                model = service.model()
                versioned = service.model("digits-torch", model.meta.version)  # may be the next table's
                assert versioned.meta.version == model.meta.version
                assert service.predict(X, model=model).shape == (2, 10)
                seen.add(model.meta.version)
                reads[slot] += 1
            except (ServingError, AssertionError) as exc:
                if "no version" in str(exc):  # asked for a version the next table no longer serves: fine
                    continue
                failures.append(f"{type(exc).__name__}: {exc}")
                return

    threads = [threading.Thread(target=read, args=(slot,), daemon=True) for slot in range(READERS)]
    for thread in threads:
        thread.start()
    try:
        for version in range(2, SWAPS + 2):
            publish(repo_copy, "digits-torch", version)
            control.reconcile(workers=1)
            assert service.table.default == ("digits-torch", version)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        service.close()
    assert not failures, failures[:5]
    assert sum(reads) > SWAPS * READERS and len(seen) >= SWAPS // 2, (sum(reads), sorted(seen))
