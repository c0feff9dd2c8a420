"""The observability middleware on the ASGI front, in process: the same traceparent answer, spans and
payload record as on the WSGI front (tests/observability), with the body read in one message or chunked."""

from __future__ import annotations

import json
import time
from pathlib import Path

import orjson
import pytest

from serving.config import Settings
from serving.fronts.asgi import AsgiApp, create_asgi_app
from serving.tools.receivers import Receiver
from tests.asgi_support import Probe, asgi_request

TRACE = "5bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "10f067aa0ba902b7"


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("mode", ["threaded", "batched"])
def test_the_asgi_front_traces_and_records_a_request(model_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     mode: str, chunked: bool) -> None:
    sample = json.loads((model_repo / "digits-torch" / "1" / "sample.json").read_text())
    target = tmp_path / "payloads.jsonl"
    with Receiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
        app = create_asgi_app(Settings(model_repository=model_repo, model="digits-torch", backend="onnx", mode=mode,
                                       tracing=True, payload_log=str(target)))
        try:
            app.service.load(workers=1)
            body = orjson.dumps({"data": [sample["data"]], "id": "asgi-1"})
            reply = asgi_request(app, Probe("POST", "/predict", body, (
                ("content-type", "application/json"), ("traceparent", f"00-{TRACE}-{PARENT}-01"))), chunked=chunked)
            assert reply.status == 200
            assert reply.headers["traceparent"].startswith(f"00-{TRACE}-")
            names = {"POST /predict", "decode", "model", "encode"}
            names |= {"batch", "queue"} if mode == "batched" else set()
            spans = receiver.wait_for(
                lambda r: s if names <= set(s := {x.name: x for x in r.spans() if x.trace_id == TRACE}) else None)
        finally:
            AsgiApp.close(app)
    assert spans["POST /predict"].parent_span_id == PARENT
    deadline = time.monotonic() + 5
    while not (target.exists() and target.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    (record,) = [json.loads(line) for line in target.read_text().splitlines()]
    assert record["trace_id"] == TRACE and record["request"]["body"]["id"] == "asgi-1"
    assert record["request"]["inputs"][0]["shape"] == [1, 8, 8]
    assert record["response"]["outputs"][0]["classes"] == [sample["label"]]
    assert record["response"]["body"]["id"] == "asgi-1"


def test_a_streamed_answer_is_kept_only_up_to_the_record_cap() -> None:
    """A WSGI answer streamed in pieces is captured up to SERVING_PAYLOAD_LOG_MAX_BYTES and one piece beyond (which
    marks it as cut), not in full: a long stream held every piece in memory until the request ended."""
    from serving.fronts.observed import _Closing, _Request

    class Ended:
        requests: list[_Request] = []

        def end(self, request: _Request) -> None:
            self.requests.append(request)

    request, observer = _Request("GET", "/stream", "/stream", True, 4096), Ended()
    answer = _Closing((b"x" * 1000 for _ in range(1000)), request, observer)  # type: ignore[arg-type]
    assert sum(len(piece) for piece in answer) == 1_000_000
    answer.close()
    assert observer.requests == [request]
    assert request.sent_bytes == sum(map(len, request.sent)) == 5000
