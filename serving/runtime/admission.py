"""Whether a model version may be served: its backend, its files and its pinned digest.

``admit(meta, settings)`` runs in the gunicorn master (before any fork) and in the model-control
watcher, and reads only files: it never imports a framework. A version passes when a backend can
serve it under the settings (one that matches its framework; a thread-safe one in threaded mode),
its artifact and every file it lists are intact, and, with ``SERVING_MODEL_SHA256`` set, its
``metadata.json`` has the pinned digest. Each refusal is one ModelLoadError or ConfigError line that
says what to do.
"""

from __future__ import annotations

from serving.backends import backend_class, is_thread_safe
from serving.config import Settings
from serving.errors import ConfigError, ModelLoadError
from serving.store.repository import ModelMetadata, sha256_file, where


def model_pins(setting: str) -> dict[str, str]:
    """``name:version=sha256,...`` (SERVING_MODEL_SHA256) as a dict."""
    pins = {}
    for entry in filter(None, (part.strip() for part in setting.split(","))):
        key, _, digest = entry.partition("=")
        pins[key.strip()] = digest.strip().lower()
    return pins


def admit(meta: ModelMetadata, settings: Settings) -> tuple[ModelMetadata, str]:
    """The backend that serves ``meta`` once its files pass their checks (ModelLoadError
    otherwise)."""
    backend = settings.backend or str(meta.raw.get("backend") or meta.framework)
    cls = backend_class(backend)  # refuses an unknown backend with a message naming the known ones
    if cls.framework and cls.framework != meta.framework:
        raise ModelLoadError(
            f"model {meta.name} was trained with {meta.framework}; the {backend} backend cannot "
            "load it"
            f" (use SERVING_BACKEND={meta.raw.get('backend') or meta.framework} or onnx)"
        )
    # with the model pool, request threads never call the backend: one pool thread does
    if settings.mode == "threaded" and not settings.pool_processes and not is_thread_safe(backend):
        raise ConfigError(
            f"the {backend} backend is process-only: use SERVING_MODE=process, "
            "SERVING_MODE=batched (one model"
            " thread), or SERVING_BACKEND=onnx to serve its ONNX export with threads"
        )
    if meta.verified:
        meta.verify(cls.artifact)
    elif not (meta.path / cls.artifact).is_file():
        raise ModelLoadError(
            f"{where(meta.path, cls.artifact)} is missing: the {backend} backend loads it"
        )
    check_pin(meta, settings.model_sha256)
    return meta, backend


def check_pin(meta: ModelMetadata, setting: str) -> None:
    """With ``SERVING_MODEL_SHA256`` set, a served version's metadata.json must match its pinned
    digest."""
    pins = model_pins(setting)
    if not pins:
        return
    key = f"{meta.name}:{meta.version}"
    if not meta.verified:
        raise ModelLoadError(
            f"{key} is a TF Serving folder with no metadata.json to pin: import it with"
            f" `serving import {meta.path} --name {meta.name}` and pin the imported version"
        )
    if key not in pins:
        raise ModelLoadError(
            f"SERVING_MODEL_SHA256 pins no digest for {key}: add {key}=<sha256 of its"
            " metadata.json> (serving digest prints them), or stop serving it"
        )
    actual = sha256_file(meta.path / "metadata.json")
    if actual != pins[key]:
        raise ModelLoadError(
            f"{where(meta.path)} does not match SERVING_MODEL_SHA256 ({actual[:12]}..."
            f" != {pins[key][:12]}...): the model was changed since it was pinned"
        )
