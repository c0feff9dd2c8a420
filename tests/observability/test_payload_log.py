"""Payload records: summaries, redaction, the cap, sampling by status, the bounded queue, both sinks,
and the records an app writes for real requests (Flask test client)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import orjson
import pytest

from serving.config import Settings
from serving.fronts.wsgi import create_app, service_of
from serving.observability import metrics
from serving.observability.payload_log import CE_REQUEST, CE_RESPONSE, CloudEventSink, LineSink, PayloadLog
from serving.observability.payload_record import Exchange, RecordOptions, build_record, summarise_json
from serving.tools.receivers import Receiver


def exchange(status: int = 200, body: bytes | None = None, **fields: object) -> Exchange:
    request = body if body is not None else orjson.dumps({"data": [[0.5] * 64], "id": "abc", "token": "s3cret"})
    values: dict[str, object] = {
        "request_id": "req-1", "time": 1_800_000_000.0, "method": "POST", "path": "/predict",
        "route": "/predict", "status": status, "latency_ms": 1.5, "model": "digits:1", "labels": ["a", "b"],
        "request_headers": [("authorization", "Bearer k"), ("user-agent", "t"), ("x-tenant", "acme")],
        "request_type": "application/json", "request_length": len(request), "request_body": request,
        "answer_type": "application/json", "answer_body": b'{"prediction": [[0.25, 0.75]]}',
        "inputs": [np.full((1, 8, 8), 0.5, dtype=np.float32)], "outputs": [np.array([[0.25, 0.75]], np.float32)],
    }
    values.update(fields)
    return Exchange(**values)  # type: ignore[arg-type]


def test_tensors_are_summarised_and_named_fields_redacted() -> None:
    record = build_record(exchange(), RecordOptions(redact=frozenset({"token", "x-tenant"})))
    request = record["request"]
    assert request["body"]["data"] == {"shape": [1, 64], "dtype": "float64", "min": 0.5, "max": 0.5, "mean": 0.5}
    assert request["body"]["token"] == "[redacted]" and request["body"]["id"] == "abc"
    assert request["headers"] == {"authorization": "[redacted]", "user-agent": "t", "x-tenant": "[redacted]"}
    assert request["inputs"][0]["shape"] == [1, 8, 8] and "thumbnail" not in request["inputs"][0]
    assert record["response"]["outputs"][0]["classes"] == ["b"]
    assert record["response"]["body"] == {"prediction": [[0.25, 0.75]]}  # small arrays stay as they are
    assert record["status"] == 200 and record["model"] == "digits:1" and record["time"].startswith("2027-01-15")


def test_a_small_thumbnail_when_asked() -> None:
    record = build_record(exchange(), RecordOptions(thumbnails=True))
    assert record["request"]["inputs"][0]["thumbnail"].startswith("data:image/png;base64,")


def test_the_mode_keeps_one_side() -> None:
    assert "response" not in build_record(exchange(), RecordOptions(mode="request"))
    assert "request" not in build_record(exchange(), RecordOptions(mode="response"))


def test_a_record_over_the_cap_loses_its_bodies_not_its_summaries() -> None:
    big = orjson.dumps({"data": [[0.5] * 64], "note": "x" * 50_000})
    record = build_record(exchange(body=big), RecordOptions(max_bytes=2048))
    assert len(orjson.dumps(record)) <= 2048
    assert record["request"]["body"] == {"omitted": "over SERVING_PAYLOAD_LOG_MAX_BYTES"}
    assert record["request"]["inputs"][0]["mean"] == 0.5


def test_a_body_cut_at_the_capture_cap_or_not_json_is_described_by_its_size() -> None:
    cut = build_record(exchange(body=b"{}", request_length=100_000, request_body=None), RecordOptions())
    assert cut["request"]["body"] == {"bytes": 100_000, "captured": False}
    binary = build_record(exchange(request_type="application/octet-stream", body=b"\x00" * 10), RecordOptions())
    assert binary["request"]["body"] == {"bytes": 10}


def test_nested_and_ragged_values_are_walked_not_broken() -> None:
    value = {"inputs": [{"name": "x", "data": list(range(100))}, {"data": [[1, 2], [3]]}], "flag": True}
    summarised = summarise_json(value, frozenset())
    assert summarised["inputs"][0]["data"]["shape"] == [100]
    assert summarised["inputs"][1]["data"] == [[1, 2], [3]] and summarised["flag"] is True


def test_sampling_by_rate_and_by_status() -> None:
    log = PayloadLog(Settings(payload_log="stdout", payload_log_rate=0.0,
                              payload_log_status_rates="5xx=1, 422=1, 4xx=0"), write=lambda e: None)
    assert log.rate_for(200) == 0.0 and log.rate_for(503) == 1.0 and log.rate_for(422) == 1.0
    assert log.rate_for(404) == 0.0
    assert not any(log.wanted(200) for _ in range(100)) and all(log.wanted(500) for _ in range(100))
    half = PayloadLog(Settings(payload_log="stdout", payload_log_rate=0.5), write=lambda e: None)
    assert 300 < sum(half.wanted(200) for _ in range(1000)) < 700


def test_a_full_buffer_drops_and_counts_and_never_holds_the_request() -> None:
    release = threading.Event()
    written = []

    def slow_sink(item: Exchange) -> None:
        release.wait(10)
        written.append(item)

    log = PayloadLog(Settings(payload_log="stdout", payload_log_queue=2), write=slow_sink)
    dropped = metrics.PAYLOAD_RECORDS.labels("dropped")
    before = dropped._value.get()
    started = time.perf_counter()
    for _ in range(20):
        log.offer(exchange())
    assert time.perf_counter() - started < 0.5
    metrics.TALLY.flush()
    assert dropped._value.get() - before >= 17  # 2 queued, at most 1 taken by the writer
    release.set()
    log.close()
    assert 2 <= len(written) <= 3


def test_a_failing_sink_is_counted_not_raised() -> None:
    def broken(item: Exchange) -> None:
        raise OSError("disk full")

    failed = metrics.PAYLOAD_RECORDS.labels("failed")
    before = failed._value.get()
    log = PayloadLog(Settings(payload_log="stdout"), write=broken)
    log.offer(exchange())
    log.close()
    metrics.TALLY.flush()
    assert failed._value.get() == before + 1


def test_json_lines_are_appended_to_a_file(tmp_path: Path) -> None:
    target = tmp_path / "payloads.jsonl"
    sink = LineSink(str(target), RecordOptions())
    sink.write(exchange())
    sink.write(exchange(status=422))
    sink.close()
    lines = [json.loads(line) for line in target.read_text().splitlines()]
    assert [line["status"] for line in lines] == [200, 422]


def test_cloudevents_in_kserve_logger_format() -> None:
    with Receiver() as sink:
        events = CloudEventSink(f"{sink.url}/events", RecordOptions())
        events.write(exchange())
        events.write(exchange(status=422, request_id="req-2"))
        events.close()
        posts = sink.posts("/events")
    assert [post.headers["ce-type"] for post in posts] == [CE_REQUEST, CE_RESPONSE, CE_REQUEST]
    first = posts[0].headers
    assert first["ce-specversion"] == "1.0" and first["ce-id"] == "req-1"
    assert first["ce-inferenceservicename"] == "digits" and first["ce-component"] == "predictor"
    assert first["content-type"] == "application/json" and "ce-source" in first and "ce-time" in first
    assert json.loads(posts[0].body)["id"] == "abc"
    assert json.loads(posts[1].body) == {"prediction": [[0.25, 0.75]]}
    assert posts[2].headers["ce-id"] == "req-2" and posts[2].headers["ce-statuscode"] == "422"


def test_a_sink_answering_an_error_is_a_failure() -> None:
    with Receiver(status=500) as sink:
        with pytest.raises(OSError):
            CloudEventSink(sink.url, RecordOptions()).write(exchange())


# -- an app's records ---------------------------------------------------------------------------------
def records_of(model_repo: Path, tmp_path: Path, requests: list[tuple[str, object]], **settings: object) -> list[dict]:
    target = tmp_path / "payloads.jsonl"
    app = create_app(Settings(model_repository=model_repo, model="digits-torch", backend="onnx",
                              payload_log=str(target), **settings))
    client = app.test_client()
    try:
        for path, body in requests:
            if isinstance(body, dict):
                client.post(path, json=body)
            else:
                client.get(path)
        # the writer thread writes them: wait for the lines to appear
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            time.sleep(0.1)
            lines = target.read_text().splitlines() if target.exists() else []
            if len(lines) >= len([1 for _, body in requests if isinstance(body, dict)]):
                break
        time.sleep(0.2)
        return [json.loads(line) for line in target.read_text().splitlines()] if target.exists() else []
    finally:
        service_of(app).close()


def test_an_app_records_inference_requests_with_their_model_input_and_output(model_repo: Path, tmp_path: Path) -> None:
    sample = json.loads((model_repo / "digits-torch" / "1" / "sample.json").read_text())
    records = records_of(model_repo, tmp_path, [("/health", None), ("/predict", {"data": [sample["data"]]}),
                                                ("/predict", {"data": [[2.0] * 64]})])
    assert [record["status"] for record in records] == [200, 422]  # /health is no inference request
    good, bad = records
    assert good["model"] == "digits-torch:1" and good["endpoint"] == "/predict"
    assert good["request"]["inputs"][0]["shape"] == [1, 8, 8]
    assert good["response"]["outputs"][0]["classes"] == [sample["label"]]
    assert bad["request"]["inputs"] == [] and "error" in bad["response"]["body"]


def test_an_app_samples_by_status(model_repo: Path, tmp_path: Path) -> None:
    sample = json.loads((model_repo / "digits-torch" / "1" / "sample.json").read_text())
    records = records_of(model_repo, tmp_path, [("/predict", {"data": [sample["data"]]}),
                                                ("/predict", {"data": [[2.0] * 64]})],
                         payload_log_rate=0.0, payload_log_status_rates="4xx=1")
    assert [record["status"] for record in records] == [422]
