"""What the ASGI tests share: the two fronts a real-server test runs, an in-process ASGI client, and the
parity table (the same requests for both fronts, every endpoint and its errors) with the comparison.

A real-server test runs either front with ``server_factory(..., **FRONTS[front])``: ``wsgi`` is the
default (flask_server:app under the mode's sync or gthread workers); ``asgi`` is asgi_server:app
under the worker SERVING_FRONT=asgi selects in gunicorn.conf.py.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterable
from typing import Any, NamedTuple

import orjson
from PIL import Image

from serving.http.routing import Endpoint

FRONTS: dict[str, dict[str, Any]] = {"wsgi": {}, "asgi": {"front": "asgi", "app": "asgi_server:app"}}
#: What gunicorn's log says when max_requests recycles a worker, per front (gunicorn's line, uvicorn's line).
RECYCLED = {"wsgi": "Autorestarting worker", "asgi": "Maximum request limit of"}
#: The two ASGI workers: the default (uvicorn-worker's, as configured) and gunicorn's native one.
ASGI_WORKERS = {"uvicorn": (), "gunicorn": ("-k", "serving.host.asgi_workers.AsgiWorker")}
JSON = "application/json"
SAMPLE = [0.0] * 64


class Probe(NamedTuple):
    """One request of the parity table."""

    method: str
    path: str
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()


class Reply(NamedTuple):
    """What is compared of an answer."""

    status: int
    content_type: str
    body: bytes
    headers: dict[str, str]


def png(size: int = 8) -> bytes:
    picture = Image.new("L", (size, size), 0)
    picture.putpixel((size // 2, size // 2), 255)
    out = io.BytesIO()
    picture.save(out, format="PNG")
    return out.getvalue()


def multipart(field: str, data: bytes) -> tuple[bytes, str]:
    boundary = "parity0boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"x.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _json(payload: Any, *headers: tuple[str, str]) -> tuple[bytes, tuple[tuple[str, str], ...]]:
    return orjson.dumps(payload), (("Content-Type", JSON), *headers)


def parity_probes(model: str = "digits-torch") -> list[Probe]:
    """Requests for every endpoint, with their errors: the same bytes go to both fronts."""
    v2_input = {"inputs": [{"name": "input", "shape": [1, 8, 8], "datatype": "FP32", "data": SAMPLE}]}
    header = orjson.dumps({"inputs": [{"name": "input", "shape": [1, 8, 8], "datatype": "FP32",
                                       "parameters": {"binary_data_size": 256}}]})
    binary = header + bytes(256)
    form, form_type = multipart("file", png())
    probes = [Probe("GET", path) for path in (
        "/health", "/health/live", "/health/ready", "/metrics", "/metadata", "/label", "/predict/test/label", "/v2",
        "/v2/health/live", "/v2/health/ready", f"/v2/models/{model}", f"/v2/models/{model}/versions/1",
        f"/v2/models/{model}/ready", f"/v2/models/{model}/versions/1/ready", f"/v2/models/{model}/versions/9",
        "/v2/models/nope", "/v2/models/%C3%A9", "/v2/repository/index", "/openapi.json", "/docs", "/", "/ops",
        "/assets/app.js", "/assets/nope.js", "/models", "/nope", "/health/", "/predict", "/inference",
    )]
    probes += [
        Probe("HEAD", "/health"), Probe("HEAD", "/predict"), Probe("OPTIONS", "/predict"), Probe("OPTIONS", "/health"),
        Probe("OPTIONS", "/nope"), Probe("PUT", "/predict"), Probe("DELETE", "/v2/models/x"),
        Probe("GET", "//health"), Probe("GET", "/v2//health/live"),
        Probe("POST", "//predict", *_json({"data": SAMPLE})),
        Probe("POST", "/predict", *_json({"data": SAMPLE, "id": "mine"})),
        Probe("POST", "/predict", *_json({"data": [SAMPLE, SAMPLE]}, ("X-Request-ID", "parity-1"))),
        Probe("POST", "/predict/label", *_json({"data": [[255] * 8] * 8, "pixel_range": [0, 255]})),
        Probe("POST", "/predict", b"{not json", (("Content-Type", JSON),)),
        Probe("POST", "/predict", orjson.dumps({"data": SAMPLE})),  # no Content-Type: 415
        Probe("POST", "/predict", *_json({"data": [0.0] * 63})),
        Probe("POST", "/predict", *_json({"nodata": 1})),
        Probe("POST", "/predict", *_json({"data": [SAMPLE] * 65})),
        Probe("POST", "/predict", *_json({"data": SAMPLE}, ("X-Request-Timeout-Ms", "soon"))),
        Probe("POST", "/predict", *_json({"data": SAMPLE}, ("X-Request-Timeout-Ms", "5000"))),
        Probe("POST", "/predict", b"x" * 3_000_000, (("Content-Type", JSON),)),
        Probe("POST", "/predict/label", png(), (("Content-Type", "image/png"),)),
        Probe("POST", "/predict/label", b"not a png", (("Content-Type", "image/png"),)),
        Probe("POST", "/predict/label", form, (("Content-Type", form_type),)),
        Probe("POST", "/predict/label", b"x", (("Content-Type", "text/plain"),)),
        Probe("POST", "/predict/stream", *_json({"data": [SAMPLE] * 5})),
        Probe("POST", "/predict/stream", *_json({"data": [0.0] * 3})),
        Probe("POST", "/inference", *_json({"images": [[0] * 8] * 8})),
        Probe("POST", "/inference/", *_json({"images": [[[0] * 8] * 8] * 2})),
        Probe("POST", "/inference/", *_json({"images": "seven"})),
        Probe("POST", f"/v2/models/{model}/infer", *_json(v2_input)),
        Probe("POST", f"/v2/models/{model}/versions/1/infer", *_json(v2_input)),
        Probe("POST", f"/v2/models/{model}/infer", binary, (("Inference-Header-Content-Length", str(len(header))),
                                                           ("Content-Type", "application/octet-stream"))),
        Probe("POST", f"/v2/models/{model}/infer", *_json({"inputs": []})),
        Probe("POST", "/v2/models/nope/infer", *_json(v2_input)),
        Probe("POST", "/v2/repository/index", *_json({"ready": True})),
        Probe("POST", f"/models/{model}/input", png(40), (("Content-Type", "image/png"),)),
        Probe("POST", f"/models/{model}/versions/1/input", png(), (("Content-Type", "image/png"),)),
    ]
    return probes


def covering_probes(endpoints: Iterable[Endpoint], probes: list[Probe], model: str = "digits-torch") -> list[Probe]:
    """``probes`` plus a plain request for each endpoint none of them reaches (an endpoint added later
    is compared too: path variables filled with the model, version 1 and app.js, an empty JSON body)."""
    from serving.http.routing import Router

    router = Router(endpoints)
    reached = set()
    for probe in probes:
        match = router.match(probe.method, probe.path.partition("?")[0])
        if match is not None:
            reached.add(match[0])
    extra = []
    for endpoint in router.endpoints:
        if endpoint not in reached:
            path = endpoint.path.replace("<name>", model).replace("<version>", "1").replace("<asset>", "app.js")
            body, headers = (b"{}", (("Content-Type", JSON),)) if endpoint.method != "GET" else (b"", ())
            extra.append(Probe(endpoint.method, path, body, headers))
    return probes + extra


#: Headers whose value is compared (Allow as a set: Flask's order follows string hashing per process).
COMPARED_HEADERS = ("x-request-id", "x-content-type-options", "allow", "retry-after", "www-authenticate",
                    "inference-header-content-length", "etag", "cache-control", "content-length")


def normalized(probe: Probe, reply: Reply) -> Reply:
    """What must be equal on both fronts: volatile parts (worker ids, fresh request ids, metrics) removed."""
    headers = {name: value for name, value in reply.headers.items() if name in COMPARED_HEADERS}
    if "allow" in headers:
        headers["allow"] = ", ".join(sorted(method.strip() for method in headers["allow"].split(",")))
    sent_id = dict((name.lower(), value) for name, value in probe.headers).get("x-request-id")
    body = reply.body
    if sent_id is None:  # a fresh random id per request: only its shape is compared
        fresh = headers.pop("x-request-id", "")
        assert len(fresh) == 32, reply
        body = body.replace(fresh.encode(), b"<id>")
    if probe.path == "/metrics":
        body = b"<metrics>"
        headers.pop("content-length", None)
    elif probe.path.endswith("/stats") and reply.status == 200:  # counters and times: only their layout
        body = orjson.dumps(_layout(orjson.loads(body)))
        headers.pop("content-length", None)
    elif reply.content_type.startswith(JSON) and body.startswith(b"{") and b'"worker"' in body:
        payload = orjson.loads(body)
        payload["worker"] = "<worker>"
        body = orjson.dumps(payload)
        headers.pop("content-length", None)
    return Reply(reply.status, reply.content_type, body, headers)


def _layout(value: Any) -> Any:
    """``value`` with every number replaced by 0 (the statistics' counts and times differ by traffic)."""
    if isinstance(value, dict):
        return {key: _layout(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_layout(item) for item in value]
    return 0 if isinstance(value, int | float) and not isinstance(value, bool) else value


def asgi_request(app: Any, probe: Probe, chunked: bool = False) -> Reply:
    """``probe`` sent to an ASGI app in process (the body in one message, or in 3 without a length)."""
    path, _, query = probe.path.partition("?")
    from urllib.parse import unquote

    headers = [(name.lower().encode(), value.encode()) for name, value in probe.headers]
    if probe.body and not chunked:
        headers.append((b"content-length", str(len(probe.body)).encode()))
    if chunked:
        headers.append((b"transfer-encoding", b"chunked"))
    third = max(1, len(probe.body) // 3)
    parts = [probe.body[i:i + third] for i in range(0, len(probe.body), third)] if chunked else [probe.body]
    messages = [{"type": "http.request", "body": part, "more_body": i < len(parts) - 1} for i, part in enumerate(parts)]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": probe.method,
             "scheme": "http", "path": unquote(path), "raw_path": path.encode(), "query_string": query.encode(),
             "headers": headers if any(name == b"host" for name, _ in headers) else [(b"host", b"localhost"), *headers],
             "server": ("127.0.0.1", 8000),
             "client": ("127.0.0.1", 5000)}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start = sent[0]
    answer_headers = {name.decode().lower(): value.decode("latin-1") for name, value in start["headers"]}
    body = b"".join(message.get("body", b"") for message in sent[1:])
    return Reply(start["status"], answer_headers.get("content-type", ""), body, answer_headers)
