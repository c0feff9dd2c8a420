"""Backend registry: one line per backend, imported lazily by name.

Adding a backend: write ``serving/backends/<name>.py`` with a ``Backend`` subclass and add one line
to ``REGISTRY``.
"""

from __future__ import annotations

import importlib

from serving.backends.base import Backend

REGISTRY: dict[str, str] = {
    "tensorflow": "serving.backends.tensorflow:KerasBackend",
    "pytorch": "serving.backends.pytorch:TorchScriptBackend",
    "onnx": "serving.backends.onnx:OnnxRuntimeBackend",
}

#: Whether each backend may be called from several request threads at once, known without
#: importing it (the master checks this before forking).
THREAD_SAFE: dict[str, bool] = {"tensorflow": True, "pytorch": False, "onnx": True}


def backend_class(name: str) -> type[Backend]:
    """The Backend subclass registered under ``name`` (imports its module, not its framework)."""
    module_name, _, class_name = REGISTRY[name].partition(":")
    cls: type[Backend] = getattr(importlib.import_module(module_name), class_name)
    return cls


__all__ = ["Backend", "REGISTRY", "THREAD_SAFE", "backend_class"]
