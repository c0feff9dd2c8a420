"""Triton's model-configuration and statistics extensions, derived from what the server knows.

Both protocols serve the same documents: REST as JSON (``GET
/v2/models/{name}[/versions/{v}]/config`` and ``.../stats``), gRPC as ``inference.ModelConfig``
and ``inference.ModelStatistics`` messages parsed from them (``serving.protocol.v2.rpcs``).
Triton's tools read them before their first request: perf_analyzer needs ``max_batch_size`` and
each input's ``name``, ``data_type`` and ``dims`` (without the batch dimension when
``max_batch_size`` > 0), and each output's ``name``; tritonclient's ``get_model_config`` and
``get_inference_statistics`` return them as they are.

The configuration is the model's metadata in Triton's terms: one FP32 input of the model's sample
shape, the ``probabilities`` output (FP32, one value per class) and the ``label`` output (one
string per sample, Triton's ``dims: [1]`` reshaped to a scalar); ``max_batch_size`` is
``SERVING_MAX_BATCH``; in batched mode ``dynamic_batching`` says how long the batcher waits; the
version policy lists the versions served. The statistics are the server's own counters, summed over
every worker (``serving.observability.metrics``): see docs/api.md for what each field holds here.
"""

from __future__ import annotations

from typing import Any

from serving.backends import backend_class
from serving.config import Settings
from serving.observability import metrics
from serving.protocol.v2.tensors import LABEL_OUTPUT
from serving.runtime.loaded_model import LoadedModel
from serving.runtime.service import InferenceService

#: The metrics the statistics are read from.
SOURCES = (
    "serving_model_requests_total",
    "serving_model_request_seconds_total",
    "serving_queue_seconds_total",
    "serving_model_last_inference_timestamp_seconds",
    "serving_inference_latency_seconds",
    "serving_batch_size",
)
NS = 1_000_000_000
FAILED = ("error", "refused")


def model_config(model: LoadedModel, versions: list[int], settings: Settings) -> dict[str, Any]:
    """Triton's ``ModelConfig`` of a served version, as its JSON mapping (field names as in the
    .proto)."""
    meta = model.meta
    config: dict[str, Any] = {
        "name": meta.name,
        # the served backend's, also when the model pool runs it
        "platform": backend_class(model.backend_name).platform,
        "backend": model.backend_name,
        "version_policy": {"specific": {"versions": versions}},
        "max_batch_size": settings.max_batch,
        "input": [
            {
                "name": meta.input_name,
                "data_type": "TYPE_FP32",
                "format": "FORMAT_NONE",
                "dims": list(meta.input_shape),
            }
        ],
        "output": [
            {"name": meta.output_name, "data_type": "TYPE_FP32", "dims": [len(meta.labels)]},
            {
                "name": LABEL_OUTPUT,
                "data_type": "TYPE_STRING",
                "dims": [1],
                "reshape": {"shape": []},
            },
        ],
        "parameters": {"framework": {"string_value": meta.framework}},
    }
    if model.batcher is not None:
        config["dynamic_batching"] = {
            "preferred_batch_size": [settings.max_batch_size],
            "max_queue_delay_microseconds": round(settings.max_delay_ms * 1000),
        }
    return config


def statistics(
    service: InferenceService, name: str | None = None, version: int | None = None
) -> list[dict[str, Any]]:
    """Triton's ``ModelStatistics`` of every served version (of ``name``, or that one version), as
    JSON mappings; ``ModelNotFound`` for a model or version that is not served."""
    if name is None:
        service.versions("")  # plans the table first when nothing did (an app without the hooks)
        keys = list(service.served)
    elif version is None:
        keys = [(name, v) for v in service.versions(service.key(name)[0])]
    else:
        keys = [service.key(name, version)]
    values = metrics.sample_values(*SOURCES)
    return [_version_statistics(name, version, values) for name, version in keys]


def _version_statistics(
    name: str, version: int, values: dict[tuple[str, tuple[tuple[str, str], ...]], float]
) -> dict[str, Any]:
    model = (("model", f"{name}:{version}"),)

    def value(sample: str, *labels: tuple[str, str]) -> float:
        return values.get((sample, tuple(sorted(model + labels))), 0.0)

    def duration(count: float, seconds: float) -> dict[str, int]:
        return {"count": round(count), "ns": round(seconds * NS)}

    success = value("serving_model_requests_total", ("outcome", "ok"))
    executions = value("serving_batch_size_count")
    queued = value("serving_queue_seconds_total")
    return {
        "name": name,
        "version": str(version),
        "last_inference": round(value("serving_model_last_inference_timestamp_seconds") * 1000),
        "inference_count": round(value("serving_batch_size_sum")),
        "execution_count": round(executions),
        "inference_stats": {
            "success": duration(
                success, value("serving_model_request_seconds_total", ("outcome", "ok"))
            ),
            # failed and refused (503) requests, as Triton counts a rejected one
            "fail": duration(
                sum(value("serving_model_requests_total", ("outcome", o)) for o in FAILED),
                sum(value("serving_model_request_seconds_total", ("outcome", o)) for o in FAILED),
            ),
            # every answered request went through the queue, for no time outside batched mode (as
            # Triton's default scheduler counts it; perf_analyzer finds the version by this count)
            "queue": duration(success, queued),
            "compute_input": duration(executions, 0.0),
            "compute_infer": duration(executions, value("serving_inference_latency_seconds_sum")),
            "compute_output": duration(executions, 0.0),
            "cache_hit": duration(0, 0.0),
            "cache_miss": duration(0, 0.0),
        },
        "batch_stats": [],
    }
