"""Tracing in process: the OTEL_* checks, the W3C context in and out, the spans of a request in every
mode (decoded by a real OTLP/HTTP receiver), sampling, and nothing at all when tracing is off."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from serving.config import Settings, otel_environment
from serving.errors import ConfigError
from serving.fronts.dispatch import Dispatcher
from serving.fronts.wsgi import create_app, service_of
from serving.runtime.batching import MicroBatcher
from serving.runtime.loaded_model import LoadedModel
from serving.tools.receivers import ReceivedSpan, Receiver

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    """A real OTLP/HTTP receiver, and the standard variables pointing the exporter at it."""
    with Receiver() as found:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", found.url)
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
        yield found


def app_for(model_repo: Path, **settings: Any) -> Flask:
    return create_app(Settings(model_repository=model_repo, model="digits-torch", backend="onnx", tracing=True,
                               **settings))


def sample(model_repo: Path) -> list[float]:
    data: list[float] = json.loads((model_repo / "digits-torch" / "1" / "sample.json").read_text())["data"]
    return data


def trace_of(receiver: Receiver, trace_id: str, names: set[str]) -> dict[str, ReceivedSpan]:
    """The spans of one trace by name, once every name in ``names`` arrived."""

    def found(r: Receiver) -> dict[str, ReceivedSpan] | None:
        spans = {span.name: span for span in r.spans() if span.trace_id == trace_id}
        return spans if names <= set(spans) else None

    result: dict[str, ReceivedSpan] = receiver.wait_for(found)
    return result


def test_otel_values_the_sdk_would_replace_are_refused() -> None:
    with pytest.raises(ConfigError, match="OTEL_TRACES_EXPORTER"):
        otel_environment({"OTEL_TRACES_EXPORTER": "jaeger"})
    with pytest.raises(ConfigError, match="OTEL_EXPORTER_OTLP_PROTOCOL"):
        otel_environment({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})
    with pytest.raises(ConfigError, match="sampling ratio"):
        otel_environment({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "half"})
    assert otel_environment({"OTEL_TRACES_SAMPLER": "TraceIdRatio", "OTEL_TRACES_SAMPLER_ARG": "0.01"})[
        "OTEL_TRACES_SAMPLER"] == "traceidratio"
    # checked at start only when tracing is on
    Settings.from_env({"OTEL_TRACES_EXPORTER": "jaeger"})
    with pytest.raises(ConfigError):
        Settings.from_env({"SERVING_TRACING": "true", "OTEL_TRACES_EXPORTER": "jaeger"})


def test_tracing_is_off_by_default_and_then_nothing_wraps_the_request_path(model_repo: Path) -> None:
    app = create_app(Settings(model_repository=model_repo, model="digits-torch", backend="onnx", mode="batched"))
    try:
        assert isinstance(app.wsgi_app, Dispatcher)
        model = service_of(app).model()
        assert model.run.__func__ is LoadedModel.run  # type: ignore[attr-defined]
        assert type(model.batcher) is MicroBatcher
        assert model._call.__func__ is LoadedModel._batched  # type: ignore[attr-defined]
    finally:
        service_of(app).close()
    # the SDK is not even imported by a server with tracing off
    code = "import flask_server, asgi_server, sys; print(any(m.startswith('opentelemetry') for m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={"SERVING_MODEL_REPOSITORY": str(model_repo), "PATH": "/usr/bin:/bin"}, check=True)
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize("mode", ["process", "batched"])
def test_a_request_continues_the_clients_trace_through_decode_model_and_encode(
        model_repo: Path, receiver: Receiver, mode: str) -> None:
    app = app_for(model_repo, mode=mode)
    try:
        answer = app.test_client().post("/predict", json={"data": [sample(model_repo)] * 2},
                                        headers={"traceparent": TRACEPARENT, "tracestate": "vendor=1"})
        assert answer.status_code == 200
        version, trace_id, span_id, flags = answer.headers["traceparent"].split("-")
        assert trace_id == CLIENT_TRACE and span_id != CLIENT_SPAN and flags in ("01", "03")
        assert answer.headers["tracestate"] == "vendor=1"
        names = {"POST /predict", "decode", "model", "encode"} | ({"queue", "batch"} if mode == "batched" else set())
        spans = trace_of(receiver, CLIENT_TRACE, names)
    finally:
        service_of(app).close()
    request = spans["POST /predict"]
    assert request.parent_span_id == CLIENT_SPAN and request.span_id == span_id and request.kind == 2  # SERVER
    assert request.attributes["http.response.status_code"] == 200 and request.attributes["http.route"] == "/predict"
    assert request.attributes["serving.model"] == "digits-torch:1" and request.attributes["serving.batch_size"] == 2
    assert request.resource["service.name"] == "serving"
    for child in ("decode", "encode"):
        assert spans[child].parent_span_id == request.span_id
    assert spans["decode"].start_ns == request.start_ns and spans["decode"].end_ns <= spans["model"].start_ns
    assert spans["model"].end_ns <= spans["encode"].start_ns <= spans["encode"].end_ns <= request.end_ns
    if mode == "batched":
        batch, queue = spans["batch"], spans["queue"]
        assert queue.parent_span_id == request.span_id and queue.links == ((CLIENT_TRACE, batch.span_id),)
        assert batch.parent_span_id == request.span_id and (CLIENT_TRACE, request.span_id) in batch.links
        assert spans["model"].parent_span_id == batch.span_id
    else:
        assert spans["model"].parent_span_id == request.span_id


def test_a_batch_links_every_request_it_served(model_repo: Path, receiver: Receiver) -> None:
    app = app_for(model_repo, mode="batched", max_delay_ms=200.0, max_batch_size=32)
    traces = [f"{i:032x}" for i in range(1, 7)]
    gate = threading.Barrier(len(traces))

    def send(trace_id: str) -> None:
        client = app.test_client()
        gate.wait()
        answer = client.post("/predict", json={"data": [sample(model_repo)]},
                             headers={"traceparent": f"00-{trace_id}-{CLIENT_SPAN}-01"})
        assert answer.status_code == 200

    try:
        service_of(app).model()  # loaded before the clients start
        threads = [threading.Thread(target=send, args=(trace_id,)) for trace_id in traces]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        requests = {t: trace_of(receiver, t, {"POST /predict", "queue"}) for t in traces}
    finally:
        service_of(app).close()
    batches = {span.span_id: span for span in receiver.spans() if span.name == "batch"}
    assert len(batches) < len(traces), "the requests were not batched together"
    linked = {link for batch in batches.values() for link in batch.links}
    for trace_id, spans in requests.items():
        assert (trace_id, spans["POST /predict"].span_id) in linked
        ((_, batch_id),) = spans["queue"].links
        assert batches[batch_id].attributes["serving.batch.requests"] == len(batches[batch_id].links)


def test_an_unsampled_request_exports_nothing_but_passes_the_context_on(
        model_repo: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0")
    app = app_for(model_repo)
    client = app.test_client()
    try:
        unsampled = client.post("/predict", json={"data": sample(model_repo)},
                                headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-00"})
        assert unsampled.headers["traceparent"].startswith(f"00-{CLIENT_TRACE}-")
        assert unsampled.headers["traceparent"].endswith("-00")
        sampled = client.post("/predict", json={"data": sample(model_repo)},
                              headers={"traceparent": f"00-{'f' * 32}-{CLIENT_SPAN}-01"})  # the parent decides
        trace_of(receiver, "f" * 32, {"POST /predict", "model"})
    finally:
        service_of(app).close()
    assert sampled.status_code == 200
    assert not [span for span in receiver.spans() if span.trace_id == CLIENT_TRACE]


def test_errors_are_traced_with_their_status(model_repo: Path, receiver: Receiver) -> None:
    app = app_for(model_repo)
    try:
        client = app.test_client()
        assert client.post("/predict", json={"data": [[9.0] * 64]},
                           headers={"traceparent": TRACEPARENT}).status_code == 422
        spans = trace_of(receiver, CLIENT_TRACE, {"POST /predict"})
        missing = client.get("/nowhere", headers={"traceparent": f"00-{'e' * 32}-{CLIENT_SPAN}-01"})
        assert missing.status_code == 404 and missing.headers["traceparent"].startswith(f"00-{'e' * 32}")
        missing.close()  # a WSGI server closes the body: the request ends there
        trace_of(receiver, "e" * 32, {"GET"})
    finally:
        service_of(app).close()
    assert spans["POST /predict"].attributes["http.response.status_code"] == 422
    assert "model" not in spans  # refused before the model
