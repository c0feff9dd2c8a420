"""Tracing, payload records and drift on real gunicorn: a client's trace through decode, queue, batch
and model call arriving at a real OTLP/HTTP receiver on both fronts; CloudEvents at a real HTTP sink,
and no request failing when the sink is gone; drift scores crossing their threshold on shifted real
MNIST and staying below it on t10k."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from serving.tools.receivers import Receiver
from tests.asgi_support import FRONTS
from tests.mnist_support import t10k_digits

pytestmark = pytest.mark.slow
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
OTEL = {"OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_SERVICE_NAME": "digits-service"}


@pytest.mark.parametrize("front", ["wsgi", "asgi"])
def test_a_clients_trace_reaches_a_real_otlp_receiver(server_factory: Any, model_repo: Path, front: str) -> None:
    sample = json.loads((model_repo / "digits-torch" / "1" / "sample.json").read_text())["data"]
    with Receiver() as receiver:
        server = server_factory(model="digits-torch", backend="onnx", mode="batched", tracing="true",
                                env={**OTEL, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url}, **FRONTS[front])
        server.start()
        answer = requests.post(f"{server.url}/v2/models/digits-torch/infer", timeout=10,
                               headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"},
                               json={"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                                 "data": sample}]})
        assert answer.status_code == 200, answer.text
        assert answer.headers["traceparent"].split("-")[1] == CLIENT_TRACE
        untraced = requests.post(f"{server.url}/predict", json={"data": sample}, timeout=10)
        assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-0[13]", untraced.headers["traceparent"])
        names = {"POST /v2/models/<name>/infer", "decode", "queue", "batch", "model", "encode"}

        def trace(r: Receiver) -> dict[str, Any] | None:
            spans = {span.name: span for span in r.spans() if span.trace_id == CLIENT_TRACE}
            return spans if names <= set(spans) else None

        spans = receiver.wait_for(trace, 30)
        server.stop()  # the workers flush what is left at exit
        new_trace = untraced.headers["traceparent"].split("-")[1]
        assert any(span.trace_id == new_trace for span in receiver.spans())
    request = spans["POST /v2/models/<name>/infer"]
    assert request.parent_span_id == CLIENT_SPAN and request.attributes["http.response.status_code"] == 200
    assert request.resource["service.name"] == "digits-service"
    assert spans["model"].parent_span_id == spans["batch"].span_id
    assert (CLIENT_TRACE, request.span_id) in spans["batch"].links
    assert spans["queue"].links == ((CLIENT_TRACE, spans["batch"].span_id),)


def test_a_grpc_clients_trace_reaches_the_receiver_through_the_model_call(server_factory: Any,
                                                                          model_repo: Path) -> None:
    import numpy as np
    import tritonclient.grpc as triton

    sample = np.asarray(json.loads((model_repo / "digits-torch" / "1" / "sample.json").read_text())["data"],
                        dtype=np.float32).reshape(1, 64)
    with Receiver() as receiver:
        server = server_factory(model="digits-torch", backend="onnx", mode="batched", tracing="true",
                                env={**OTEL, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url})
        server.start()
        client = triton.InferenceServerClient(server.grpc_target)
        try:
            tensor = triton.InferInput("input", [1, 64], "FP32")
            tensor.set_data_from_numpy(sample)
            answer = client.infer("digits-torch", [tensor],
                                  headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"})
            assert answer.as_numpy("probabilities").shape == (1, 10)
        finally:
            client.close()
        rpc = "inference.GRPCInferenceService/ModelInfer"

        def trace(r: Receiver) -> dict[str, Any] | None:
            spans = {span.name: span for span in r.spans() if span.trace_id == CLIENT_TRACE}
            return spans if {rpc, "queue", "batch", "model"} <= set(spans) else None

        spans = receiver.wait_for(trace, 30)
        server.stop()
    assert spans[rpc].parent_span_id == CLIENT_SPAN and spans[rpc].attributes["rpc.system"] == "grpc"
    assert spans["model"].parent_span_id == spans["batch"].span_id
    assert (CLIENT_TRACE, spans[rpc].span_id) in spans["batch"].links


def test_payload_records_reach_a_cloudevents_sink_and_a_dead_sink_fails_no_request(
        server_factory: Any, model_repo: Path) -> None:
    sample = json.loads((model_repo / "digits-torch" / "1" / "sample.json").read_text())["data"]
    with Receiver() as sink:
        server = server_factory(model="digits-torch", backend="onnx", payload_log=f"{sink.url}/events",
                                payload_log_redact="id")
        server.start()
        for index in range(10):
            assert requests.post(f"{server.url}/predict", json={"data": sample, "id": f"r{index}"},
                                 timeout=10).status_code == 200
        events = sink.wait_for(lambda r: r.posts("/events") if len(r.posts("/events")) >= 20 else None)
        server.stop()
    kinds = sorted(event.headers["ce-type"] for event in events)
    assert kinds == ["org.kubeflow.serving.inference.request"] * 10 + ["org.kubeflow.serving.inference.response"] * 10
    request = json.loads(next(e.body for e in events if e.headers["ce-type"].endswith("request")))
    assert request["id"] == "[redacted]" and request["data"]["shape"] == [8, 8]
    # the sink is gone now: every request still answers, the failures are counted
    server = server_factory(model="digits-torch", backend="onnx", payload_log=f"{sink.url}/events")
    server.start()
    for _ in range(10):
        assert requests.post(f"{server.url}/predict", json={"data": sample}, timeout=10).status_code == 200
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        text = requests.get(f"{server.url}/metrics", timeout=10).text
        failed = re.search(r'serving_payload_records_total\{outcome="failed"\} ([0-9.]+)', text)
        if failed and float(failed.group(1)) == 10:
            break
        time.sleep(0.5)
    assert failed and float(failed.group(1)) == 10, text


def drift_scores(url: str) -> tuple[dict[str, float], float]:
    text = requests.get(f"{url}/metrics", timeout=10).text
    scores = {match[0]: float(match[1]) for match in
              re.findall(r'serving_drift_score\{input="([^"]+)",model="mnist-torch",version="1"\} (\S+)', text)}
    samples = re.search(r'serving_drift_window_samples\{model="mnist-torch",version="1"\} (\S+)', text)
    return scores, float(samples.group(1)) if samples else 0.0


def send(url: str, images: np.ndarray) -> None:
    with requests.Session() as session:
        for start in range(0, len(images), 50):
            answer = session.post(f"{url}/predict", json={"data": images[start:start + 50].tolist()}, timeout=30)
            assert answer.status_code == 200, answer.text


def scores_after(url: str, count: int) -> dict[str, float]:
    """The drift scores once every worker's window holds ``count`` samples."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        scores, samples = drift_scores(url)
        if samples == count and scores:
            return scores
        time.sleep(0.5)
    raise AssertionError(f"the window holds {samples} samples, not {count}")


def test_drift_crosses_its_threshold_on_shifted_mnist_and_not_on_t10k(
        server_factory: Any, mnist_repo: Path) -> None:
    images, _ = t10k_digits(2000)
    window_s = 6.0
    server = server_factory(mnist_repo, model="mnist-torch", backend="onnx", mode="threaded", drift="true",
                            drift_window_s=str(window_s), drift_min_samples="1000")
    server.start()
    send(server.url, images)
    unshifted = scores_after(server.url, 2000)
    assert len(unshifted) == 18 and "class_prior" in unshifted  # mean intensity, 16 bands, class prior
    assert max(unshifted.values()) < 0.25, unshifted
    for name, shifted in (("inverted", 1.0 - images), ("moved 6 pixels right", np.roll(images, 6, axis=2))):
        time.sleep(window_s + 1.5)  # the previous traffic leaves the window
        send(server.url, shifted)
        scores = scores_after(server.url, 2000)
        assert max(scores.values()) > 0.25, (name, scores)
        assert sum(score > 0.25 for score in scores.values()) >= 4, (name, scores)
    assert "serving_drift_threshold{model=\"mnist-torch\",version=\"1\"} 0.25" in requests.get(
        f"{server.url}/metrics", timeout=10).text


def test_a_payload_log_file_that_cannot_be_written_stops_the_start(server_factory: Any, tmp_path: Path) -> None:
    server = server_factory(model="digits-torch", backend="onnx", payload_log=str(tmp_path / "missing" / "p.jsonl"))
    with pytest.raises(AssertionError, match="cannot be appended to"):
        server.start(timeout=30)
