"""Settings: the only module that reads ``os.environ``.

Every setting is declared once, as a field of ``Settings`` with its default and a one-line
description; ``Settings.from_env()`` reads ``SERVING_<NAME>`` for each field, converts it to the
field's type and validates the whole, raising ``ConfigError`` with a message that says how to fix
the value. ``python -m serving.config`` prints every setting with its current value.
"""

from __future__ import annotations

import os
import re
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from serving.errors import ConfigError

PREFIX = "SERVING_"
#: Unprefixed names accepted when the SERVING_ one is unset.
ALIASES = {"SERVING_LOG_FORMAT": "LOG_FORMAT"}
Mode = Literal["process", "threaded", "batched"]
BACKEND_PATTERN = re.compile(r"^(tensorflow|pytorch|onnx|[A-Za-z_][\w.]*:[A-Za-z_]\w*)$")
LogLevel = Literal["debug", "info", "warning", "error", "critical"]
LogFormat = Literal["text", "json"]
_MODEL_ENTRY = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}(:(\d{1,9}|\*))?"
#: ``*``, or comma-separated ``name``, ``name:version`` or ``name:*`` (all versions of name).
MODELS_PATTERN = re.compile(rf"^(\*|{_MODEL_ENTRY}(\s*,\s*{_MODEL_ENTRY})*)$")
BIND_PATTERN = re.compile(r"^(unix:.+|\[[0-9a-fA-F:]+\]:\d{1,5}|[A-Za-z0-9.-]*:\d{1,5})$")


def available_cores() -> int:
    """CPU cores this process may run on (respects affinity masks and containers' cpusets)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


@dataclass(frozen=True)
class Settings:
    """Validated server settings. Construct with ``Settings.from_env()`` or directly in tests."""

    bind: str = field(default="127.0.0.1:8000", metadata=_doc("address:port (or unix:PATH) to listen on"))
    workers: int = field(default_factory=available_cores, metadata=_doc("gunicorn worker processes (default: cores)"))
    threads: int = field(
        default=0, metadata=_doc("request threads per worker (threaded, batched); 0 = 4 threaded, 16 batched")
    )
    mode: Mode = field(
        default="process", metadata=_doc("process (sync), threaded (gthread, shared model) or batched (micro-batching)")
    )
    math_threads: int = field(
        default=0, metadata=_doc("intra-op threads per worker for the framework; 0 = cores // workers, at least 1")
    )
    model_repository: Path = field(default=Path("models"), metadata=_doc("model repository root directory"))
    model: str = field(default="", metadata=_doc("model to serve; empty = digits-tf, else the only model present"))
    model_version: int = field(default=0, metadata=_doc("version to serve; 0 = the latest"))
    models: str = field(
        default="", metadata=_doc("also serve (v2 API): * = every model and version, or e.g. digits-torch,x:1,y:*")
    )
    backend: str = field(
        default="", metadata=_doc("tensorflow, pytorch, onnx or module:Class; empty = the model's own framework")
    )
    timeout: int = field(default=30, metadata=_doc("seconds before a silent worker is killed and replaced"))
    graceful_timeout: int = field(default=30, metadata=_doc("seconds in-flight requests get on reload/shutdown"))
    keepalive: int = field(default=5, metadata=_doc("seconds to hold an idle keep-alive connection (threaded)"))
    max_requests: int = field(default=0, metadata=_doc("recycle a worker after this many requests; 0 = never"))
    max_requests_jitter: int = field(default=0, metadata=_doc("random extra requests before recycling"))
    backlog: int = field(default=2048, metadata=_doc("pending connections the listen socket queues"))
    log_level: LogLevel = field(default="info", metadata=_doc("debug, info, warning, error or critical"))
    log_format: LogFormat = field(default="text", metadata=_doc("text, or json for one JSON object per line"))
    log_file: str = field(default="", metadata=_doc("error/access log path; empty = stderr (run/server.log as daemon)"))
    access_log: bool = field(default=True, metadata=_doc("log one line per request"))
    max_body_bytes: int = field(default=2 * 1024 * 1024, metadata=_doc("largest request body accepted (413 beyond)"))
    max_batch: int = field(default=64, metadata=_doc("most samples in one request (422 beyond)"))
    max_image_pixels: int = field(default=4_000_000, metadata=_doc("largest uploaded image, width x height (413)"))
    max_batch_size: int = field(default=32, metadata=_doc("batched: most samples the model runs at once"))
    max_delay_ms: float = field(
        default=5.0, metadata=_doc("batched: longest wait for more requests, from a batch's first request")
    )
    max_queue: int = field(default=64, metadata=_doc("batched: requests waiting per model before 503"))
    request_timeout_ms: int = field(
        default=5000, metadata=_doc("deadline per request (504 after); header X-Request-Timeout-Ms overrides")
    )
    metrics_dir: str = field(
        default="", metadata=_doc("prometheus multiprocess directory; empty = a fresh temporary one per server")
    )

    def __post_init__(self) -> None:
        if self.backend and not BACKEND_PATTERN.match(self.backend):
            raise ConfigError(
                f"SERVING_BACKEND={self.backend!r} is not one of: tensorflow, pytorch, onnx (or a module:Class)"
            )
        if self.models and not MODELS_PATTERN.match(self.models):
            raise ConfigError(
                f"SERVING_MODELS={self.models!r} is not * or a comma-separated list of name, name:version or name:*;"
                " e.g. SERVING_MODELS=digits-tf,digits-torch:1"
            )
        if not BIND_PATTERN.match(self.bind):
            raise ConfigError(f"SERVING_BIND={self.bind!r} is not HOST:PORT or unix:PATH; e.g. 127.0.0.1:8000")
        for name in ("workers", "timeout", "backlog", "max_body_bytes", "max_batch", "max_image_pixels",
                     "max_batch_size", "max_queue", "request_timeout_ms"):
            _require(name, getattr(self, name), minimum=1)
        for name in ("threads", "math_threads", "model_version", "graceful_timeout", "keepalive", "max_requests",
                     "max_delay_ms"):
            _require(name, getattr(self, name), minimum=0)
        if self.max_delay_ms > 1000:
            raise ConfigError(f"SERVING_MAX_DELAY_MS={self.max_delay_ms:g} is over 1000; batching waits are ~1-10 ms")
        _require("max_requests_jitter", self.max_requests_jitter, minimum=0)
        if self.max_body_bytes < 1024:
            raise ConfigError(f"SERVING_MAX_BODY_BYTES={self.max_body_bytes} is too small for one sample; use >= 1024")

    @property
    def threads_per_worker(self) -> int:
        """Concurrent requests one worker serves: 1 in process mode."""
        if self.mode == "process":
            return 1
        return self.threads or (16 if self.mode == "batched" else 4)

    def math_threads_for(self, workers: int) -> int:
        """Intra-op threads each of ``workers`` workers may use so that workers x threads <= cores."""
        if self.math_threads:
            return self.math_threads
        return max(1, available_cores() // max(1, workers))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read ``SERVING_*`` variables (empty values mean the default), then apply ``overrides``."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        hints = typing.get_type_hints(cls)
        for item in fields(cls):
            key = PREFIX + item.name.upper()
            raw = env.get(key, "").strip() or env.get(ALIASES.get(key, ""), "").strip()
            if raw:
                values[item.name] = _convert(key, raw, hints[item.name])
        values.update(overrides)
        return cls(**values)

    @classmethod
    def describe(cls) -> list[tuple[str, str, str]]:
        """(variable, default, description) for every setting, for docs and ``--help`` output."""
        rows = []
        for item in fields(cls):
            default = item.default_factory() if callable(item.default_factory) else item.default
            rows.append((PREFIX + item.name.upper(), "" if default is None else str(default), item.metadata["doc"]))
        return rows


def _require(name: str, value: float, minimum: int) -> None:
    if value < minimum:
        raise ConfigError(f"{PREFIX}{name.upper()}={value} must be >= {minimum}")


def _convert(key: str, raw: str, hint: Any) -> Any:
    """Turn one environment string into the field's type, or explain what is expected."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # Optional[X]: X without None
        hint = next(arg for arg in args if arg is not type(None))
        args = typing.get_args(hint)
    if typing.get_origin(hint) is Literal:
        value = raw.lower()
        if value not in args:
            raise ConfigError(f"{key}={raw!r} is not one of: {', '.join(args)}")
        return value
    if hint is bool:
        lowered = raw.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}={raw!r} is not a boolean; use true or false")
    if hint is int:
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{key}={raw!r} is not a whole number; e.g. {key}=2") from None
    if hint is float:
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"{key}={raw!r} is not a number; e.g. {key}=5") from None
    if hint is Path:
        return Path(raw)
    return raw


def main() -> None:
    """Print every setting, its environment variable and its current value."""
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    for variable, default, doc in Settings.describe():
        current = getattr(settings, variable[len(PREFIX) :].lower())
        print(f"{variable:<28} = {current!s:<18} (default {default or '-'}): {doc}")


if __name__ == "__main__":
    main()
