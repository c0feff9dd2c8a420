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
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any, Literal, NamedTuple

from serving.errors import ConfigError

PREFIX = "SERVING_"
#: Unprefixed names accepted when the SERVING_ one is unset.
ALIASES = {"SERVING_LOG_FORMAT": "LOG_FORMAT"}
Mode = Literal["process", "threaded", "batched"]
Front = Literal["wsgi", "asgi"]
ModelControl = Literal["none", "poll", "explicit"]
Swap = Literal["load_first", "unload_first"]
POLICY_PATTERN = re.compile(r"^(latest(:[1-9][0-9]{0,2})?|all)$")
#: A registered backend's name (the registry says which exist) or module:Class.
BACKEND_PATTERN = re.compile(r"^([a-z][a-z0-9_]*|[A-Za-z_][\w.]*:[A-Za-z_]\w*)$")
LogLevel = Literal["debug", "info", "warning", "error", "critical"]
LogFormat = Literal["text", "json"]
_MODEL_ENTRY = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}(:(\d{1,9}|\*))?"
#: ``*``, or comma-separated ``name``, ``name:version`` or ``name:*`` (all versions of name).
MODELS_PATTERN = re.compile(rf"^(\*|{_MODEL_ENTRY}(\s*,\s*{_MODEL_ENTRY})*)$")
_PIN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}:\d{1,9}=[0-9a-fA-F]{64}"
PINS_PATTERN = re.compile(rf"^{_PIN}(\s*,\s*{_PIN})*$")
POOL_PATTERN = re.compile(r"^(auto|[0-9]|[1-5][0-9]|6[0-4])$")
BIND_PATTERN = re.compile(r"^(unix:.+|\[[0-9a-fA-F:]+\]:\d{1,5}|[A-Za-z0-9.-]*:\d{1,5})$")
GRPC_BIND_PATTERN = re.compile(r"^(off|next|\[[0-9a-fA-F:]+\]:\d{1,5}|[A-Za-z0-9.-]*:\d{1,5})$")


def available_cores() -> int:
    """CPU cores this process may run on (respects affinity masks and containers' cpusets)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


#: The cores of the whole server, kept by a worker before it is pinned to its share of them
#: (``serving.host.affinity``); None elsewhere, where the process's own cores are the server's.
_server_cores: int | None = None


def server_cores() -> int:
    """The cores the server may use: a pinned worker's math threads are counted against these,
    not against its own share."""
    return _server_cores or available_cores()


def keep_server_cores(cores: int) -> None:
    """Remember the server's cores in a worker about to be pinned to a share of them."""
    global _server_cores
    _server_cores = cores


def setting(
    default: Any = MISSING,
    doc: str = "",
    *,
    factory: Callable[[], Any] | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    pattern: re.Pattern[str] | None = None,
    hint: str = "",
    default_doc: str = "",
    accepts: str = "",
) -> Any:
    """Declare one setting: its default, a one-line doc, and the bounds ``Settings`` enforces.

    ``pattern`` must match a non-empty string value; ``hint`` completes the refusal message of a
    pattern or a maximum ("is not HOST:PORT ..."); ``default_doc`` describes a computed default and
    ``accepts`` the accepted values, for the docs, where a pattern alone would not say it.
    """
    metadata = {
        "doc": doc,
        "minimum": minimum,
        "maximum": maximum,
        "pattern": pattern,
        "hint": hint,
        "default_doc": default_doc,
        "accepts": accepts,
    }
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


#: Longest silence from a client in the middle of a request before it is treated as gone, in
#: seconds; the same as nginx's client_header_timeout and client_body_timeout in deploy/nginx.conf.
CLIENT_SILENCE_S = 10.0


def silence_limit(worker_timeout: float) -> float:
    """Seconds a client may stay silent mid-request (both fronts): well under the heartbeat timeout
    of a sync worker."""
    return min(CLIENT_SILENCE_S, max(1.0, worker_timeout / 3))


@dataclass(frozen=True)
class Settings:
    """Validated server settings. Construct with ``Settings.from_env()`` or directly in tests."""

    bind: str = setting(
        "127.0.0.1:8000",
        "address:port (or unix:PATH) to listen on",
        pattern=BIND_PATTERN,
        hint="is not HOST:PORT or unix:PATH; e.g. 127.0.0.1:8000",
        accepts="HOST:PORT or unix:PATH",
    )
    workers: int = setting(
        doc="gunicorn worker processes",
        factory=available_cores,
        minimum=1,
        default_doc="the number of cores",
    )
    threads: int = setting(
        0,
        "request threads per worker (threaded, batched; the pool of the asgi front, 1 in process"
        " mode); 0 = 4 threaded, 16 batched or with the model pool",
        minimum=0,
    )
    mode: Mode = setting(
        "process", "process (sync), threaded (gthread, shared model) or batched (micro-batching)"
    )
    front: Front = setting(
        "wsgi",
        "wsgi (flask_server:app, sync/gthread workers) or asgi (asgi_server:app, one event"
        " loop per worker, SERVING_MODE's request threads as a bounded pool)",
    )
    math_threads: int = setting(
        0,
        "intra-op threads per worker for the framework; 0 = cores // workers, at least 1",
        minimum=0,
    )
    cpu_affinity: bool = setting(
        False,
        "pin each worker (every thread of it: HTTP, gRPC, the model's) to its own share of the"
        " cores this server may use, cores // workers each (several workers share one when"
        " workers > cores); off when other servers share the machine's cores (docs/operations.md,"
        " CPU affinity)",
    )
    balance_connections: bool = setting(
        True,
        "spread keep-alive connections evenly over the workers (threaded and batched modes): a"
        " worker holding more connections than another waits 1 ms before accepting one, so that"
        " the other takes it (docs/operations.md, connection balance)",
    )
    share_memory: bool = setting(
        True,
        "import the backends' frameworks (and load ONNX Runtime and TorchScript models) in the"
        " master and freeze the collector before fork, so every worker shares those pages;"
        " false = each worker imports and loads its own (docs/modes.md, memory)",
    )
    model_pool: str = setting(
        "auto",
        "model pool processes that hold the models for every HTTP worker (which then import no"
        " framework, and send tensors through shared memory); 0 = off, each worker loads its own;"
        " auto = 1 when a served model runs on TensorFlow in process mode (unless model control or"
        " SERVING_SHARE_MEMORY=false), else 0",
        pattern=POOL_PATTERN,
        hint="is not auto or a number of processes from 0 to 64",
        accepts="auto | 0 to 64",
    )
    pool_max_batch_size: int = setting(
        0,
        "model pool: most samples one pool process runs at once; 0 = SERVING_MAX_BATCH_SIZE x"
        " SERVING_WORKERS / SERVING_MODEL_POOL (its batches hold every HTTP worker's requests)",
        minimum=0,
    )
    pool_priority: str = setting(
        "auto",
        "model pool: nice levels its processes run ahead of the HTTP workers, whose nice value goes"
        " up instead where the pool's may not go down; auto = 19 when a served model takes 100 us"
        " or more of CPU per sample (timed once loaded), else 0. Its models then leave half the"
        " cores to the HTTP workers (PyTorch, ONNX Runtime); none while its math threads fill"
        " every core (docs/operations.md, model pool priority)",
        pattern=re.compile(r"^(auto|[0-9]|1[0-9])$"),
        hint="is not auto or a number of nice levels from 0 to 19",
        accepts="auto | 0 to 19",
    )
    pool_dir: str = setting(
        "",
        "directory of the model pool's sockets (its own, mode 0700); empty = a fresh temporary"
        " one per server",
    )
    pool_device: str = setting(
        "cpu",
        "the device the model pool's processes run the models on",
        pattern=re.compile(r"^cpu$"),
        hint="is not a device of this build: its backends run on cpu only",
        accepts="cpu",
    )
    model_repository: Path = setting(Path("models"), "model repository root directory")
    model: str = setting(
        "",
        "model the native API serves; empty = the first of mnist-torch, mnist-tf, digits-tf"
        " present (what train.py trains), else the only model present",
    )
    model_version: int = setting(0, "version to serve; 0 = the latest", minimum=0)
    models: str = setting(
        "",
        "also serve (v2 API): * = every model and version, or e.g. digits-torch,x:1,y:*",
        pattern=MODELS_PATTERN,
        accepts="*, or a comma-separated list of name, name:N, name:*",
        hint="is not * or a comma-separated list of name, name:version or name:*;"
        " e.g. SERVING_MODELS=digits-tf,digits-torch:1",
    )
    backend: str = setting(
        "",
        "a registered backend (tensorflow, pytorch, onnx, savedmodel) or module:Class;"
        " empty = the model's own",
        pattern=BACKEND_PATTERN,
        hint="is not a backend name or a module:Class (e.g. onnx, mypkg.runtime:MyBackend)",
        accepts="tensorflow | pytorch | onnx | savedmodel | module:Class",
    )
    timeout: int = setting(30, "seconds before a silent worker is killed and replaced", minimum=1)
    graceful_timeout: int = setting(
        30, "seconds in-flight requests get on reload/shutdown", minimum=0
    )
    keepalive: int = setting(
        5, "seconds to hold an idle keep-alive connection (threaded, batched)", minimum=0
    )
    max_requests: int = setting(
        0, "recycle a worker after this many requests; 0 = never", minimum=0
    )
    max_requests_jitter: int = setting(0, "random extra requests before recycling", minimum=0)
    backlog: int = setting(2048, "pending connections the listen socket queues", minimum=1)
    log_level: LogLevel = setting("info", "debug, info, warning, error or critical")
    log_format: LogFormat = setting(
        "text", "text, or json for one JSON object per line (alias: LOG_FORMAT)"
    )
    log_file: str = setting("", "error/access log path; empty = stderr (run/server.log as daemon)")
    access_log: bool = setting(True, "log one line per request")
    max_body_bytes: int = setting(
        0,
        "largest request body accepted (413 beyond); 0 = derived: max(256 KiB, 64 KiB +"
        " SERVING_MAX_BATCH x the largest served input's H x W x 24 bytes)",
        minimum=0,
    )
    max_batch: int = setting(64, "most samples in one request (422 beyond)", minimum=1)
    max_image_pixels: int = setting(
        4_000_000, "largest uploaded image, width x height (413 beyond)", minimum=1
    )
    max_batch_size: int = setting(32, "batched: most samples the model runs at once", minimum=1)
    max_delay_ms: float = setting(
        5.0,
        "batched: longest wait for more requests, from a batch's first request",
        minimum=0,
        maximum=1000,
        hint="; batching waits are ~1-10 ms",
    )
    max_queue: int = setting(
        64,
        "batched: requests waiting per model before 503; asgi front: also requests"
        " waiting for a pool thread",
        minimum=1,
    )
    request_timeout_ms: int = setting(
        5000, "deadline per request (504 after); header X-Request-Timeout-Ms overrides", minimum=1
    )
    metrics_dir: str = setting(
        "",
        "prometheus multiprocess directory of its own (one holding other files is refused);"
        " empty = a fresh temporary one per server",
    )
    model_sha256: str = setting(
        "",
        "pinned sha256 of each served version's metadata.json (which lists the sha256 of"
        " every file): name:version=HEX,...; set, it refuses any other version",
        pattern=PINS_PATTERN,
        accepts="name:N=sha256,... (serving digest prints it)",
        hint="is not a comma-separated list of name:version=<64 hex digits>",
    )
    model_control: ModelControl = setting(
        "none",
        "none (models fixed at start), poll (follow the repository) or"
        " explicit (POST /v2/repository/models/NAME/load and /unload)",
    )
    poll_seconds: float = setting(
        5.0, "poll mode: seconds between two looks at the repository", minimum=0.1, maximum=3600
    )
    version_policy: str = setting(
        "latest",
        "with model control: versions served per model: latest, latest:N or all"
        " (SERVING_MODELS=name:N pins one)",
        pattern=POLICY_PATTERN,
        hint="is not latest, latest:N or all",
        accepts="latest | latest:N | all",
    )
    swap: Swap = setting(
        "load_first",
        "a version switch loads the new version before unloading the old"
        " (load_first, twice the memory for a moment) or unloads first (unload_first,"
        " 503 + Retry-After meanwhile)",
    )
    # canary and shadow traffic between versions of a model (serving.runtime.traffic)
    traffic: str = setting(
        "",
        "share each model's unversioned requests between its versions, the first listed being"
        " the stable one: NAME: vN P%, ...; e.g. digits: v1 90%, v2 10%; 'vN shadow [P%]'"
        " copies requests to a version without answering from it; 'sticky HEADER' keeps a"
        " header value on one version; the versions named are served (docs/operations.md)",
        accepts="NAME: vN P%, vN shadow [P%], sticky HEADER; NAME: ...",
    )
    traffic_window_s: float = setting(
        30.0,
        "traffic: seconds over which a candidate's error rate and p99 are compared with the"
        " stable version's (in each worker)",
        minimum=1,
        maximum=3600,
    )
    traffic_error_margin: float = setting(
        0.05,
        "traffic: roll a candidate back when its error rate over the window exceeds the stable"
        " version's by more than this (0.05 = 5 points)",
        minimum=0,
        maximum=1,
    )
    traffic_p99_margin_ms: float = setting(
        50.0,
        "traffic: roll a candidate back when its p99 over the window exceeds the stable"
        " version's by more than this",
        minimum=0,
    )
    traffic_min_requests: int = setting(
        50,
        "traffic: requests the candidate and the stable version must each have answered in a"
        " worker's window before the candidate is judged",
        minimum=1,
    )
    traffic_rollback: bool = setting(
        True,
        "traffic: roll a failing candidate back automatically (its weight to 0, logged, counted"
        " and recorded as an event)",
    )
    shadow_queue: int = setting(
        256,
        "traffic: shadow copies waiting per worker; more are dropped and counted",
        minimum=1,
    )
    api_keys: str = setting(
        "",
        "inference keys, comma-separated: Authorization: Bearer KEY is then required on"
        " inference and metadata endpoints; empty = open (see docs/security.md)",
        accepts="comma-separated keys",
    )
    api_keys_file: str = setting(
        "",
        "file with one inference key per line (read by each worker at start, so a"
        " reload with SIGHUP picks up a new file)",
    )
    admin_keys: str = setting(
        "",
        "admin keys, comma-separated: required on /metrics and /v2/repository/*; an admin"
        " key also passes inference endpoints",
        accepts="comma-separated keys",
    )
    admin_keys_file: str = setting(
        "", "file with one admin key per line (read like SERVING_API_KEYS_FILE)"
    )
    allowed_hosts: str = setting(
        "",
        "Host header values accepted, comma-separated (* = any); empty = localhost,"
        " 127.0.0.1, [::1] and the bind address",
        accepts="comma-separated hosts or *",
    )
    certfile: str = setting("", "TLS certificate (PEM); with SERVING_KEYFILE gunicorn serves HTTPS")
    keyfile: str = setting("", "TLS private key (PEM), readable only by the server's user")
    grpc_bind: str = setting(
        "off",
        "gRPC address of the Open Inference Protocol's gRPC API (with grpc.health.v1 and server"
        " reflection), shared by every worker: HOST:PORT, next (the HTTP bind's host with its"
        " port + 1: 8001 next to 8000, as Triton), or off",
        pattern=GRPC_BIND_PATTERN,
        hint="is not HOST:PORT, next or off; e.g. 127.0.0.1:8001 (gRPC workers share a TCP port)",
        accepts="HOST:PORT | next | off",
    )
    grpc_threads: int = setting(
        0,
        "gRPC handler threads per worker; 0 = the mode's request threads (at least 2, so a"
        " health check never waits behind an inference)",
        minimum=0,
    )
    grpc_max_connection_age_s: float = setting(
        0,
        "close a gRPC connection (gracefully, GOAWAY) after this many seconds, so long-lived"
        " clients spread over the workers again; 0 = never",
        minimum=0,
    )
    max_client_timeout_ms: int = setting(
        0,
        "longest deadline a client may ask for with X-Request-Timeout-Ms;"
        " 0 = SERVING_REQUEST_TIMEOUT_MS",
        minimum=0,
    )
    # -- observability: tracing, payload logs, drift (docs/operations.md); all off by default ------
    tracing: bool = setting(
        False,
        "OpenTelemetry traces of every request (W3C traceparent in and out), exported as the"
        " standard OTEL_* variables say (OTLP over HTTP by default; docs/operations.md#tracing)",
    )
    payload_log: str = setting(
        "",
        "payload records of inference requests and answers: stdout, a file path, or the"
        " http(s):// URL of a CloudEvents sink (KServe's logger format); empty = off",
        pattern=re.compile(r"^(stdout|https?://\S+|(?![A-Za-z][A-Za-z0-9+.-]*:)[^\n]+)$"),
        hint="is not stdout, a file path or an http(s):// URL",
        accepts="stdout | PATH | http(s)://HOST[:PORT]/PATH",
    )
    payload_log_mode: Literal["all", "request", "response"] = setting(
        "all", "what a payload record holds: all, request or response (KServe's logger modes)"
    )
    payload_log_rate: float = setting(
        1.0, "fraction of inference requests recorded (0 to 1)", minimum=0, maximum=1
    )
    payload_log_status_rates: str = setting(
        "",
        "rates by answer status that override SERVING_PAYLOAD_LOG_RATE, e.g. 5xx=1,4xx=0.5,503=0",
        pattern=re.compile(
            r"^([1-5]xx|[1-5][0-9]{2})\s*=\s*(0(\.[0-9]+)?|1(\.0+)?)"
            r"(\s*,\s*([1-5]xx|[1-5][0-9]{2})\s*=\s*(0(\.[0-9]+)?|1(\.0+)?))*$"
        ),
        hint="is not a comma-separated list of STATUS=RATE (STATUS 200 or 2xx, RATE 0 to 1)",
        accepts="comma-separated STATUS=RATE (STATUS a code or 1xx-5xx)",
    )
    payload_log_max_bytes: int = setting(
        16384,
        "largest payload record; bodies beyond it are left out (their tensors' summaries stay)",
        minimum=1024,
    )
    payload_log_redact: str = setting(
        "",
        "JSON fields and headers written as [redacted] in payload records, comma-separated"
        " (Authorization, Cookie and keys always are)",
        accepts="comma-separated names",
    )
    payload_log_thumbnails: bool = setting(
        False, "payload records of image models carry a small PNG of the first input"
    )
    payload_log_queue: int = setting(
        1024,
        "payload records a worker buffers for its writer; beyond, records are dropped and counted",
        minimum=1,
    )
    drift: bool = setting(
        False,
        "drift scores (PSI of inputs and predicted classes against the reference statistics"
        " recorded at train or import) as serving_drift_score on /metrics",
    )
    drift_window_s: float = setting(
        300.0, "seconds of traffic the drift window holds", minimum=1, maximum=86400
    )
    drift_min_samples: int = setting(
        500, "samples the window needs before a drift score is exported", minimum=1
    )
    drift_threshold: float = setting(
        0.25,
        "drift score above which the alert fires (exported as serving_drift_threshold; PSI 0.1"
        " moderate, 0.25 significant)",
        minimum=0,
    )

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for item in fields(self):
            _validate(
                PREFIX + item.name.upper(),
                getattr(self, item.name),
                item.metadata,
                hints[item.name],
            )
        if 0 < self.max_body_bytes < 1024:
            raise ConfigError(
                f"SERVING_MAX_BODY_BYTES={self.max_body_bytes} is too small for one sample: use 0"
                " (derived from the model) or >= 1024"
            )
        if self.grpc_bind and self.grpc_bind == self.bind:
            raise ConfigError(
                f"SERVING_GRPC_BIND={self.grpc_bind} is SERVING_BIND too: gRPC needs a port of its"
                " own (e.g. the next one), or off"
            )
        if bool(self.certfile) != bool(self.keyfile):
            raise ConfigError(
                "TLS needs both SERVING_CERTFILE and SERVING_KEYFILE (PEM files), or neither"
            )

    def grpc_address(self, http_bind: str | None = None) -> str | None:
        """Where the gRPC front listens (None: nowhere): ``SERVING_GRPC_BIND``, or with ``next``
        the port after ``http_bind``'s (gunicorn's first bind; default ``SERVING_BIND``)."""
        if self.grpc_bind == "off":
            return None
        if self.grpc_bind != "next":
            return self.grpc_bind
        bind = http_bind or self.bind
        host, _, port = bind.rpartition(":")
        if bind.startswith("unix:") or not port.isdigit():
            return None
        if int(port) >= 65535:
            raise ConfigError(
                f"the gRPC port next to {bind} would be {int(port) + 1}: set SERVING_GRPC_BIND"
                " (or off)"
            )
        return f"{host}:{int(port) + 1}"

    @property
    def pool_processes(self) -> int:
        """Model pool processes, 0 = none. ``auto`` is 0 here: the gunicorn config resolves it
        for the models it serves (``serving.host.model_pool.resolve_auto_pool``) before anything
        else reads it."""
        return int(self.model_pool) if self.model_pool.isdigit() else 0

    @property
    def threads_per_worker(self) -> int:
        """Concurrent requests one worker serves: 1 in process mode without the model pool."""
        if self.mode == "process" and not self.pool_processes:
            return 1
        # batched mode and the model pool: request threads mostly wait for the model, which batches
        return self.threads or (16 if self.mode == "batched" or self.pool_processes else 4)

    def math_threads_for(self, workers: int) -> int:
        """Intra-op threads each of ``workers`` workers may use so that workers x threads <=
        cores."""
        if self.math_threads:
            return self.math_threads
        return max(1, server_cores() // max(1, workers))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read ``SERVING_*`` variables (empty values mean the default), then apply
        ``overrides``."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        hints = _hints(cls)
        for item in fields(cls):
            key = PREFIX + item.name.upper()
            raw = env.get(key, "").strip() or env.get(ALIASES.get(key, ""), "").strip()
            if raw:
                values[item.name] = _convert(key, raw, hints[item.name])
        values.update(overrides)
        settings = cls(**values)
        if settings.tracing:
            otel_environment(env)  # a value the SDK would silently replace is refused at start
        return settings

    @classmethod
    def describe(cls) -> list[SettingDoc]:
        """Every setting as documented: the variable, its default, what it does and its bounds."""
        rows = []
        hints = _hints(cls)
        for item in fields(cls):
            meta = item.metadata
            if meta["default_doc"]:
                default = meta["default_doc"]
            else:
                default = "" if item.default in (None, "") else str(item.default)
                default = default.lower() if isinstance(item.default, bool) else default
            rows.append(
                SettingDoc(
                    PREFIX + item.name.upper(),
                    default,
                    meta["doc"],
                    _bounds(meta, hints[item.name]),
                )
            )
        return rows


#: The standard OpenTelemetry variables whose values the server checks at start: the SDK reads
#: these and the rest of its OTEL_* variables itself (endpoint, headers, timeouts, resource, batch
#: processor), and falls back to a default with a warning on a value it does not know; a typo in
#: a sampler or exporter name must stop the start instead. (docs/operations.md#tracing)
OTEL_CHOICES: dict[str, tuple[str, ...]] = {
    "OTEL_SDK_DISABLED": ("true", "false"),
    "OTEL_TRACES_EXPORTER": ("otlp", "console", "none"),
    "OTEL_EXPORTER_OTLP_PROTOCOL": ("http/protobuf",),
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": ("http/protobuf",),
    "OTEL_TRACES_SAMPLER": (
        "always_on",
        "always_off",
        "traceidratio",
        "parentbased_always_on",
        "parentbased_always_off",
        "parentbased_traceidratio",
    ),
}


def otel_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The ``OTEL_*`` variables set, lower-cased where the SDK compares them so; ConfigError for a
    value the SDK would replace by its default (an unknown exporter, protocol or sampler, a sampler
    argument that is not a ratio)."""
    env = os.environ if environ is None else environ
    found = {key: value.strip() for key, value in env.items() if key.startswith("OTEL_")}
    for key, choices in OTEL_CHOICES.items():
        value = found.get(key, "").lower()
        if value and value not in choices:
            raise ConfigError(f"{key}={found[key]!r} is not one of: {', '.join(choices)}")
        if value:
            found[key] = value
    if found.get("OTEL_TRACES_SAMPLER", "").endswith("traceidratio"):
        raw = found.get("OTEL_TRACES_SAMPLER_ARG", "1")
        try:
            ratio = float(raw)
        except ValueError:
            ratio = -1.0
        if not 0.0 <= ratio <= 1.0:
            raise ConfigError(
                f"OTEL_TRACES_SAMPLER_ARG={raw!r} is not a sampling ratio from 0 to 1;"
                " e.g. 0.01 samples one trace in a hundred"
            )
    return found


class SettingDoc(NamedTuple):
    """One row of the settings reference."""

    variable: str
    default: str
    doc: str
    accepts: str


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _bounds(meta: Mapping[str, Any], hint: Any) -> str:
    """What values a setting accepts, in words, for the docs."""
    if meta["accepts"]:
        return str(meta["accepts"])
    if typing.get_origin(hint) is Literal:
        return " | ".join(typing.get_args(hint))
    kind = {int: "integer", float: "number", bool: "true | false", Path: "path"}.get(hint, "text")
    low, high = meta["minimum"], meta["maximum"]
    if low is not None and high is not None:
        return f"{kind}, {low:g} to {high:g}"
    if low is not None:
        return f"{kind} >= {low:g}"
    return meta["accepts"] or kind


def _validate(key: str, value: Any, meta: Mapping[str, Any], hint: Any) -> None:
    """Refuse a value outside its declared bounds with a message that says how to fix it."""
    if typing.get_origin(hint) is Literal and value not in typing.get_args(hint):
        raise ConfigError(f"{key}={value!r} is not one of: {', '.join(typing.get_args(hint))}")
    low, high = meta["minimum"], meta["maximum"]
    if low is not None and value < low:
        raise ConfigError(f"{key}={value:g} must be >= {low:g}")
    if high is not None and value > high:
        raise ConfigError(f"{key}={value:g} must be <= {high:g}{meta['hint']}")
    pattern = meta["pattern"]
    if pattern is not None and value and not pattern.match(value):
        raise ConfigError(f"{key}={value!r} {meta['hint']}")


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


def main(argv: list[str] | None = None) -> int:
    """``serving config``: print every setting, its environment variable and its current value."""
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for row in Settings.describe():
        current = getattr(settings, row.variable[len(PREFIX) :].lower())
        print(f"{row.variable:<28} = {current!s:<18} (default {row.default or '-'}): {row.doc}")
    try:  # read by the OpenTelemetry SDK itself when SERVING_TRACING is on
        otel = otel_environment()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for key, value in sorted(otel.items()):
        shown = "(set)" if "HEADERS" in key else value  # headers carry credentials
        print(f"{key:<28} = {shown} (read by the OpenTelemetry SDK)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
