"""The ASGI front in process: the same answers as the WSGI app for every endpoint, its body limits, its
pool, the stream, the lifespan. Real servers (both ASGI workers, keep-alive, idle connections) are in
test_asgi_server.py."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from serving.config import Settings
from serving.errors import DeadlineExceeded, QueueFull
from serving.fronts.asgi import AsgiApp, AsgiRequest, create_asgi_app
from serving.fronts.asgi_pool import RequestPool
from serving.fronts.wsgi import create_app, service_of
from serving.http.routing import Router
from serving.protocol.endpoints import ENDPOINTS
from serving.protocol.stream import NDJSON
from tests.asgi_support import (
    JSON,
    SAMPLE,
    Probe,
    Reply,
    asgi_request,
    covering_probes,
    normalized,
    parity_probes,
)


@pytest.fixture(scope="module")
def settings(model_repo: Path) -> Settings:
    return Settings.from_env({}, model_repository=model_repo, model="digits-torch", backend="onnx", workers=1,
                             mode="threaded")


@pytest.fixture(scope="module")
def fronts(settings: Settings) -> Iterator[tuple[Any, AsgiApp]]:
    flask_app = create_app(settings)
    asgi_app = create_asgi_app(settings)
    service_of(flask_app).load()  # as gunicorn's post_worker_init does on both fronts
    asgi_app.service.load()
    yield flask_app.test_client(), asgi_app
    asgi_app.close()


def flask_request(client: Any, probe: Probe) -> Reply:
    # The test client would read "//health" as a URL with the host "health": a real server passes the path.
    overrides = {"PATH_INFO": probe.path, "HTTP_HOST": "localhost"} if probe.path.startswith("//") else {}
    answer = client.open(probe.path, method=probe.method, data=probe.body, headers=list(probe.headers),
                         environ_overrides=overrides)
    headers = {name.lower(): value for name, value in answer.headers.items()}
    return Reply(answer.status_code, headers.get("content-type", ""), answer.get_data(), headers)


def test_every_endpoint_answers_the_same_bytes_on_both_fronts(fronts: tuple[Any, AsgiApp]) -> None:
    client, asgi_app = fronts
    probes = covering_probes(ENDPOINTS, parity_probes())
    statuses = set()
    for probe in probes:
        wsgi = normalized(probe, flask_request(client, probe))
        asgi = normalized(probe, asgi_request(asgi_app, probe))
        if probe.path == "/predict/stream" and wsgi.status == 200:  # streamed: no Content-Length on ASGI
            wsgi.headers.pop("content-length")
        assert asgi == wsgi, probe
        statuses.add(wsgi.status)
    assert {200, 400, 404, 405, 413, 415, 422} <= statuses, statuses


def test_a_chunked_body_is_read_to_one_byte_past_the_limit(fronts: tuple[Any, AsgiApp]) -> None:
    _, asgi_app = fronts
    limit = asgi_app.service.body_limit
    body = orjson.dumps({"data": [SAMPLE, SAMPLE]})
    probe = Probe("POST", "/predict", body, (("Content-Type", JSON), ("X-Request-ID", "chunked")))
    assert asgi_request(asgi_app, probe, chunked=True) == asgi_request(asgi_app, probe)
    huge = asgi_request(asgi_app, probe._replace(body=b"x" * (limit + 10)), chunked=True)
    assert huge.status == 413 and huge.body == b'{"error":"the body is over the limit of %d bytes"}' % limit


def test_keys_and_hosts_are_checked_alike(settings: Settings) -> None:
    keyed = Settings.from_env({}, **{**settings.__dict__, "api_keys": "inference-key-0123456789",
                                     "admin_keys": "admin-key-0123456789ab"})
    client, asgi_app = create_app(keyed).test_client(), create_asgi_app(keyed)
    cases = [
        Probe("GET", "/metadata"),
        Probe("GET", "/metadata", headers=(("Authorization", "Bearer wrong-key-0123456789"),)),
        Probe("GET", "/metadata", headers=(("Authorization", "Bearer inference-key-0123456789"),)),
        Probe("GET", "/metrics", headers=(("Authorization", "Bearer inference-key-0123456789"),)),
        Probe("GET", "/health"), Probe("POST", "/predict", b"x" * 3_000_000, (("Content-Type", JSON),)),
        Probe("GET", "/metadata", headers=(("Host", "evil.example"),
                                           ("Authorization", "Bearer admin-key-0123456789ab"))),
    ]
    try:
        for probe in cases:
            assert normalized(probe, asgi_request(asgi_app, probe)) == normalized(probe, flask_request(client, probe))
    finally:
        asgi_app.close()


def test_routes_non_ascii_segments_and_reads_the_scope_itself() -> None:
    router = Router(ENDPOINTS)
    endpoint, params = router.match("GET", "/v2/models/é/versions/1")  # type: ignore[misc]
    assert endpoint.path == "/v2/models/<name>/versions/<version>" and params == {"name": "é", "version": "1"}
    assert router.match("GET", "/é") is None and router.allowed("/v2/models/é/ready") == ["GET"]
    assert router.match_direct("POST", "/v2/models/é/infer") is None  # the direct routes leave it to Flask
    request = AsgiRequest({"method": "POST", "path": "/v2/models/é", "http_version": "1.1", "query_string": b"a=1",
                           "headers": [(b"content-type", b"application/json"), (b"x-request-id", b"a"),
                                       (b"x_request_id", b"spoof"), (b"accept", b"a"), (b"accept", b"b"),
                                       (b"content-length", b"12")]})
    assert request.path == "/v2/models/é" and request.method == "POST" and request.query == "a=1"
    assert request.mimetype == JSON and request.request_id == "a"  # the underscore name dropped
    assert request.header("Accept") == "a,b" and request.content_length() == 12 and request.input_terminated


def test_a_declared_length_over_the_limit_is_refused_before_any_body_is_read(fronts: tuple[Any, AsgiApp]) -> None:
    _, asgi_app = fronts
    received: list[int] = []
    sent: list[dict[str, Any]] = []
    scope = {"type": "http", "method": "POST", "path": "/predict", "http_version": "1.1", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"content-length", b"1000000")]}

    async def receive() -> dict[str, Any]:
        received.append(1)
        return {"type": "http.request", "body": b"x" * 65536, "more_body": len(received) < 4}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(asgi_app(scope, receive, send))
    assert sent[0]["status"] == 413 and b"1000000 bytes" in sent[1]["body"]
    assert len(received) == 4  # nothing read before the answer; then a bounded drain until the client stopped


def test_the_pool_refuses_at_once_when_its_wait_line_is_full_and_stops_waiting_at_the_backstop() -> None:
    pool = RequestPool(threads=1, max_waiting=1, backstop_s=0.2, hang_limit_s=60)
    release = threading.Event()

    async def scenario() -> list[Any]:
        first = asyncio.ensure_future(pool.run(release.wait, 5))
        second = asyncio.ensure_future(pool.run(time.sleep, 0))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        with pytest.raises(QueueFull):
            await pool.run(time.sleep, 0)
        assert time.monotonic() - started < 0.05
        results = await asyncio.gather(first, second, return_exceptions=True)
        assert pool.admitted == 2, "the slots stay taken while the threads are busy"
        release.set()
        deadline = time.monotonic() + 5
        while pool.admitted and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert pool.admitted == 0 and await pool.run(sum, (1, 2)) == 3
        return results

    results = asyncio.run(scenario())
    assert all(isinstance(result, DeadlineExceeded) for result in results), results
    pool.shutdown()


def test_the_stream_yields_the_predict_answers_line_by_line(fronts: tuple[Any, AsgiApp]) -> None:
    client, asgi_app = fronts
    batch = [SAMPLE] * 7
    probabilities = client.post("/predict", json={"data": batch}).get_json()["prediction"]
    sent: list[dict[str, Any]] = []
    body = orjson.dumps({"data": batch})
    scope = {"type": "http", "method": "POST", "path": "/predict/stream", "http_version": "1.1", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(asgi_app(scope, receive, send))
    assert sent[0]["status"] == 200 and (b"content-type", NDJSON.encode()) in sent[0]["headers"]
    chunks = [message["body"] for message in sent[1:] if message["body"]]
    assert len(chunks) == 7 and not sent[-1].get("more_body")  # one message per line, then the end
    lines = [orjson.loads(chunk) for chunk in chunks]
    assert [line["index"] for line in lines] == list(range(7))
    for line, expected in zip(lines, probabilities, strict=True):
        assert line["probabilities"] == pytest.approx(expected, abs=1e-6)


def test_lifespan_loads_the_model_and_shuts_down(settings: Settings) -> None:
    app = create_asgi_app(settings)
    events = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if len(sent) == 1:
            assert app.service.ready, "the models are loaded before startup completes"
        return events.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app({"type": "lifespan"}, receive, send))
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    broken = create_asgi_app(Settings.from_env({}, **{**settings.__dict__, "model": "absent"}))
    sent.clear()
    events[:] = [{"type": "lifespan.startup"}]
    asyncio.run(broken({"type": "lifespan"}, receive, send))
    assert sent[0]["type"] == "lifespan.startup.failed" and "absent" in sent[0]["message"]


def test_websocket_connections_are_refused(fronts: tuple[Any, AsgiApp]) -> None:
    _, asgi_app = fronts
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(asgi_app({"type": "websocket", "path": "/", "headers": []}, receive, send))
    assert sent == [{"type": "websocket.close", "code": 1008}]  # a server without the extension: its 403
    sent.clear()
    scope = {"type": "websocket", "path": "/", "headers": [(b"x-request-id", b"ws-1")], "http_version": "1.1",
             "extensions": {"websocket.http.response": {}}}
    asyncio.run(asgi_app(scope, receive, send))
    start, body = sent
    headers = dict(start["headers"])
    assert start["type"] == "websocket.http.response.start" and start["status"] == 400
    assert headers[b"content-type"] == b"application/json" and headers[b"x-request-id"] == b"ws-1"
    assert headers[b"x-content-type-options"] == b"nosniff"
    assert json.loads(body["body"]) == {"error": "WebSocket connections are not served here: use HTTP"}
