"""Settings: parsing from the environment and validation messages that say how to fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.config import Settings, available_cores
from serving.errors import ConfigError


def test_defaults_run_as_is() -> None:
    settings = Settings.from_env({})
    assert settings.bind == "127.0.0.1:8000" and settings.mode == "process"
    assert settings.workers == available_cores() and settings.model_repository == Path("models")
    assert settings.backend == "" and settings.model == "" and settings.model_version == 0


def test_environment_values_are_typed() -> None:
    settings = Settings.from_env({
        "SERVING_WORKERS": "3", "SERVING_MODE": "Threaded", "SERVING_BACKEND": "onnx", "SERVING_ACCESS_LOG": "off",
        "SERVING_MODEL_REPOSITORY": "/srv/models", "SERVING_MAX_BATCH": " 16 ", "SERVING_BIND": "[::1]:9000",
        "SERVING_MODEL": "", "UNRELATED": "x",
    })
    assert (settings.workers, settings.mode, settings.backend) == (3, "threaded", "onnx")
    assert settings.access_log is False and settings.model_repository == Path("/srv/models")
    assert settings.max_batch == 16 and settings.bind == "[::1]:9000" and settings.model == ""


@pytest.mark.parametrize(("env", "message"), [
    ({"SERVING_WORKERS": "two"}, "SERVING_WORKERS='two' is not a whole number"),
    ({"SERVING_WORKERS": "0"}, "SERVING_WORKERS=0 must be >= 1"),
    ({"SERVING_MODE": "async"}, "SERVING_MODE='async' is not one of: process, threaded, batched"),
    ({"SERVING_BACKEND": "Jax!"}, "is not a backend name or a module:Class"),
    ({"SERVING_BACKEND": "os:system; rm"}, "is not a backend name or a module:Class"),
    ({"SERVING_ACCESS_LOG": "maybe"}, "is not a boolean"),
    ({"SERVING_BIND": "localhost"}, "is not HOST:PORT"),
    ({"SERVING_MAX_BODY_BYTES": "10"}, "SERVING_MAX_BODY_BYTES=10 is too small for one sample"),
    ({"SERVING_MAX_DELAY_MS": "5000"}, "SERVING_MAX_DELAY_MS=5000 must be <= 1000; batching waits are ~1-10 ms"),
    ({"SERVING_MODELS": "a b"}, "or a comma-separated list of name, name:version"),
    ({"SERVING_MAX_REQUESTS": "-1"}, "must be >= 0"),
])
def test_invalid_values_explain_the_fix(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        Settings.from_env(env)


def test_log_format_alias() -> None:
    assert Settings.from_env({"LOG_FORMAT": "json"}).log_format == "json"
    assert Settings.from_env({"LOG_FORMAT": "json", "SERVING_LOG_FORMAT": "text"}).log_format == "text"


def test_math_threads_fit_workers_to_cores() -> None:
    cores = available_cores()
    assert Settings.from_env({}).math_threads_for(1) == cores
    assert Settings.from_env({}).math_threads_for(cores * 4) == 1
    assert Settings.from_env({"SERVING_MATH_THREADS": "3"}).math_threads_for(8) == 3


def test_describe_lists_every_setting() -> None:
    names = [row[0] for row in Settings.describe()]
    for expected in ("SERVING_BIND", "SERVING_WORKERS", "SERVING_THREADS", "SERVING_MODE", "SERVING_MODEL_REPOSITORY",
                     "SERVING_MODEL", "SERVING_MODEL_VERSION", "SERVING_BACKEND", "SERVING_TIMEOUT",
                     "SERVING_GRACEFUL_TIMEOUT", "SERVING_MAX_REQUESTS", "SERVING_MAX_REQUESTS_JITTER",
                     "SERVING_BACKLOG", "SERVING_LOG_LEVEL", "SERVING_MAX_BODY_BYTES", "SERVING_MAX_BATCH"):
        assert expected in names
    assert all(row.doc and row.accepts for row in Settings.describe())


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(ConfigError, match="SERVING_MODE='fast' is not one of: process, threaded, batched"):
        Settings(mode="fast")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="SERVING_MAX_QUEUE=0 must be >= 1"):
        Settings(max_queue=0)


def test_grpc_is_off_unless_set_and_next_is_the_port_after_the_http_one() -> None:
    assert Settings().grpc_address() is None  # a second listening port is something to ask for
    assert Settings(grpc_bind="next").grpc_address() == "127.0.0.1:8001"
    assert Settings(grpc_bind="next").grpc_address("0.0.0.0:9000") == "0.0.0.0:9001"
    assert Settings(grpc_bind="next", bind="unix:/run/serving.sock").grpc_address() is None
    assert Settings(grpc_bind="10.0.0.5:7001").grpc_address("0.0.0.0:9000") == "10.0.0.5:7001"
    with pytest.raises(ConfigError, match="SERVING_GRPC_BIND"):
        Settings.from_env({"SERVING_GRPC_BIND": "everywhere"})
