"""Backend registry: one line per backend, imported lazily by name.

Adding a backend: write ``serving/backends/<name>.py`` with a ``Backend`` subclass (its class
attributes say everything else: name, artifact, thread safety, v2 platform, native framework) and
add one line to ``REGISTRY``. A backend outside this package can be named directly as
``module:Class`` (``SERVING_BACKEND=mypkg.runtime:MyBackend``); its module must not import a
framework at import time, since the master imports it to read those attributes.
"""

from __future__ import annotations

import importlib

from serving.backends.base import Backend
from serving.errors import ModelLoadError

REGISTRY: dict[str, str] = {
    "tensorflow": "serving.backends.tensorflow:KerasBackend",
    "pytorch": "serving.backends.pytorch:TorchScriptBackend",
    "onnx": "serving.backends.onnx:OnnxRuntimeBackend",
    "savedmodel": "serving.backends.savedmodel:SavedModelBackend",
}


def backend_class(name: str) -> type[Backend]:
    """The Backend subclass registered under ``name``, or named ``module:Class`` (imports no
    framework)."""
    module_name, _, class_name = REGISTRY.get(name, name).partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ModelLoadError(
            f"backend {name!r} is neither one of {', '.join(REGISTRY)} nor an importable"
            f" module:Class ({exc})"
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise ModelLoadError(f"backend {name!r} is not a serving.backends.Backend subclass")
    return cls


def is_thread_safe(name: str) -> bool:
    """Whether request threads may call the backend concurrently (read from the class; no
    framework import)."""
    return backend_class(name).thread_safe


__all__ = ["Backend", "REGISTRY", "backend_class", "is_thread_safe"]
