"""The hostile inputs an attack run found getting through (issue 23), each against real servers on both fronts.

Decode-work bombs (a progressive JPEG of thousands of scans, small PNGs that decode to 16 MB), bad framing
(malformed chunk sizes, bodies cut short), a WebSocket upgrade on the ASGI front, and bidi controls in a path:
each gets a clean 4xx JSON answer (or 503/504), no worker dies, the event loop keeps answering, and memory
stays bounded. The model-control cases (a file swapped under a pinned digest, a version copied in file by
file, names that are not names, paths in answers) are in ``tests/server/test_hostile_control.py``.
"""

from __future__ import annotations

import io
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import psutil
import pytest
import requests
from PIL import Image

from tests.asgi_support import FRONTS
from tests.conftest import GunicornServer

pytestmark = pytest.mark.slow


def progressive_jpeg_bomb(scans: int) -> bytes:
    """A 2000x2000 progressive JPEG whose last scan (16 bytes) is repeated ``scans`` times: about 256 KiB for
    16,000 scans, and seconds of decoding for a decoder that runs them all."""
    out = io.BytesIO()
    Image.new("L", (2000, 2000), 128).save(out, "JPEG", progressive=True, quality=90)
    data = out.getvalue()
    last = data.rindex(b"\xff\xda")
    return data[:last] + data[last:-2] * scans + b"\xff\xd9"


def big_png() -> bytes:
    """2000x2000 RGBA (4 million pixels, the default cap): about 16 MB decoded from a file of a few KB."""
    pixels = np.zeros((2000, 2000, 4), dtype=np.uint8)
    pixels[900:1100, 900:1100] = 255
    out = io.BytesIO()
    Image.fromarray(pixels, "RGBA").save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module", params=list(FRONTS))
def server(request: pytest.FixtureRequest, model_repo: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[GunicornServer]:
    """One worker in batched mode (the ASGI front decodes on its loop there), a 1 s client-silence bound."""
    srv = GunicornServer(model_repo, tmp_path_factory.mktemp("logs"), model="digits-torch", backend="onnx",
                         mode="batched", workers=1, timeout=3, **FRONTS[request.param])
    with srv:
        yield srv


def raw(server: GunicornServer, data: bytes, wait_s: float = 10.0) -> tuple[int, bytes]:
    """Send ``data`` as it is and read the answer: (status, body)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=wait_s) as sock:
        sock.sendall(data)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
                head, _, body = answer.partition(b"\r\n\r\n")
                length = [line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
                if length and len(body) >= int(length[0].split(b":")[1]):
                    break
        except TimeoutError:
            pass
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else 0
    return status, answer.partition(b"\r\n\r\n")[2]


def alive(server: GunicornServer) -> None:
    answer = requests.get(server.url + "/health", timeout=5)
    assert answer.status_code == 200, answer.text


def test_a_progressive_jpeg_of_thousands_of_scans_is_refused_at_once(server: GunicornServer) -> None:
    body = progressive_jpeg_bomb(16_000)
    started = time.monotonic()
    for path in ("/predict", "/models/digits-torch/input"):
        answer = requests.post(server.url + path, data=body, headers={"Content-Type": "image/jpeg"}, timeout=30)
        assert answer.status_code == 413 and "scans" in answer.json()["error"], answer.text
    assert time.monotonic() - started < 2.0
    alive(server)


def test_pictures_decode_off_the_event_loop_and_in_bounded_memory(server: GunicornServer) -> None:
    """16 clients upload 2000x2000 PNGs for 4 s: every answer is 200, 503 or 504 JSON; /health/live keeps
    answering within 50 ms (the ASGI loop decodes none of them); the worker's peak RSS stays within 2x idle."""
    worker = psutil.Process(server.pid).children()[0]
    body = big_png()
    for _ in range(3):  # warm: the first decodes allocate the decoder's own buffers
        requests.post(server.url + "/predict", data=body, headers={"Content-Type": "image/png"}, timeout=30)
    idle = worker.memory_info().rss
    statuses: list[int] = []
    stop = threading.Event()

    def upload() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                answer = session.post(server.url + "/predict", data=body, headers={"Content-Type": "image/png"},
                                      timeout=30)
                statuses.append(answer.status_code)
                assert answer.headers["Content-Type"] == "application/json"

    clients = [threading.Thread(target=upload, daemon=True) for _ in range(16)]
    for client in clients:
        client.start()
    probes: list[float] = []
    peak = idle
    deadline = time.monotonic() + 4.0
    while time.monotonic() < deadline:
        started = time.perf_counter()
        assert requests.get(server.url + "/health/live", timeout=5).status_code == 200
        probes.append(time.perf_counter() - started)
        peak = max(peak, worker.memory_info().rss)
        time.sleep(0.05)
    stop.set()
    for client in clients:
        client.join(30)
    assert statuses and set(statuses) <= {200, 503, 504}, sorted(set(statuses))
    assert statuses.count(200) > 0
    if server.env.get("SERVING_FRONT") == "asgi":
        assert statistics.median(probes) < 0.05, (statistics.median(probes), max(probes))
    assert peak < 2 * idle, (idle / 2**20, peak / 2**20)
    alive(server)


@pytest.mark.parametrize("chunks", [b"-5\r\nhello\r\n0\r\n\r\n", b"zz\r\nhello\r\n0\r\n\r\n",
                                    b"5\r\nhel"])
def test_malformed_or_cut_chunked_bodies_are_a_400(server: GunicornServer, chunks: bytes) -> None:
    head = (b"POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
    status, body = raw(server, head + chunks)
    assert status == 400, body
    assert "error" in orjson.loads(body)
    alive(server)


def test_a_body_shorter_than_its_content_length_is_not_served_as_complete(server: GunicornServer) -> None:
    sample = orjson.dumps({"data": [0.0] * 64})
    head = (f"POST /predict/label HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(sample) + 100}\r\n\r\n").encode()
    status, body = raw(server, head + sample)
    assert status == 400 and "error" in orjson.loads(body), (status, body)
    alive(server)


def test_bidi_and_format_controls_are_escaped_in_the_access_log(server: GunicornServer) -> None:
    requests.get(server.url + "/x%E2%80%AEgnp.exe", timeout=5)
    requests.get(server.url + "/y%E2%80%8Bz", timeout=5)  # U+200B, a zero-width space
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and "gnp.exe" not in server.log():
        time.sleep(0.1)
    log = server.log()
    assert "\\u202egnp.exe" in log and "\u202e" not in log, log[-2000:]
    assert "\\u200bz" in log and "\u200b" not in log


def test_a_websocket_upgrade_gets_the_projects_json_400(server: GunicornServer) -> None:
    head = (b"GET /v2 HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            b"X-Request-ID: ws-probe\r\n\r\n")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    head_part, _, body = answer.partition(b"\r\n\r\n")
    assert head_part.split(b" ", 2)[1] == b"400", answer
    headers = head_part.lower()
    assert b"content-type: application/json" in headers and b"x-content-type-options: nosniff" in headers
    assert b"x-request-id: ws-probe" in headers
    assert "error" in orjson.loads(body)
