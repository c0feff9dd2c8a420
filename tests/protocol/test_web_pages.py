"""The web pages' handlers in process (serving/protocol/web.py): the pages and assets with their caching and
Content-Security-Policy, the served-model list, and the framing endpoint the front page sends pictures to.

The pages in a real browser against real gunicorn are tests/server/test_web.py.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest
from flask import Flask
from flask.testing import FlaskClient
from PIL import Image, ImageDraw

from serving.config import Settings
from serving.fronts.wsgi import create_app, service_of
from serving.protocol.web import CSP, web_files
from tests.protocol.conftest import serve_in_process

KEY = "pages-inference-key-0042"


@pytest.fixture(scope="module")
def app(model_repo: Path) -> Iterator[Flask]:
    yield from serve_in_process(Settings.from_env(
        {}, model_repository=model_repo, models="*", backend="onnx", workers=1, access_log=False,
    ))


def drawn_seven(size: int = 280) -> bytes:
    """A 7 as the page's pad exports it: a white stroke on black, PNG."""
    image = Image.new("L", (size, size), 0)
    ImageDraw.Draw(image).line([(80, 56), (200, 56), (118, 238)], fill=255, width=22, joint="curve")
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def test_the_pages_carry_a_strict_csp_and_revalidate_by_etag(client: FlaskClient) -> None:
    for path, marker in (("/", b"<h1>Draw a digit</h1>"), ("/ops", b"<h1>Operators' panel</h1>")):
        page = client.get(path)
        assert page.status_code == 200 and page.content_type == "text/html; charset=utf-8" and marker in page.data
        assert page.headers["Content-Security-Policy"] == CSP and page.headers["Cache-Control"] == "no-cache"
        assert page.headers["X-Frame-Options"] == "DENY" and page.headers["X-Request-ID"]
        assert b"<script>" not in page.data and b" style=" not in page.data  # nothing inline: CSP would block it
        again = client.get(path, headers={"If-None-Match": f'"other", {page.headers["ETag"]}'})
        assert again.status_code == 304 and again.data == b""
        assert client.head(path).status_code == 200


def test_assets_are_fingerprinted_by_the_pages_and_cached_for_a_year(client: FlaskClient) -> None:
    page = client.get("/").get_data(as_text=True)
    urls = re.findall(r'"(/assets/[a-z0-9.-]+)\?v=([0-9a-f]{16})"', page)
    assert sorted(name for name, _ in urls) == ["/assets/app.css", "/assets/app.js", "/assets/common.js",
                                                "/assets/icon.svg"]
    for url, version in urls:
        current = client.get(f"{url}?v={version}")
        assert current.status_code == 200 and current.headers["ETag"] == f'"{version}"'
        assert current.headers["Cache-Control"] == "public, max-age=31536000, immutable"
        assert client.get(url).headers["Cache-Control"] == "no-cache"  # no fingerprint: revalidate
    assert client.get("/assets/app.css").content_type == "text/css; charset=utf-8"
    assert client.get("/assets/icon.svg").content_type == "image/svg+xml"


@pytest.mark.parametrize("name", ["missing.js", "index.html", "APP.JS", "app.py", "..%2Fapp.js", "a" * 60 + ".js"])
def test_only_the_pages_assets_are_served(client: FlaskClient, name: str) -> None:
    answer = client.get(f"/assets/{name}")
    assert answer.status_code == 404 and answer.json is not None and "error" in answer.json


def test_every_web_file_is_served_with_its_type() -> None:
    files = web_files()
    assert {"index.html", "ops.html", "app.js", "common.js", "ops.js", "app.css", "icon.svg"} <= set(files)
    assert all(file.etag.startswith('"') and file.body for file in files.values())


def test_models_lists_what_is_served_with_accuracy_and_input(client: FlaskClient, model_repo: Path) -> None:
    answer = client.get("/models")
    assert answer.status_code == 200
    models = answer.json["models"]
    assert [(m["name"], m["version"]) for m in models] == [("digits-tf", "1"), ("digits-torch", "1")]
    recorded = orjson.loads((model_repo / "digits-torch" / "1" / "metadata.json").read_bytes())
    torch = models[1]
    assert torch["framework"] == "pytorch" and torch["backend"] == "onnx" and torch["platform"] == "onnxruntime_onnx"
    assert torch["accuracy"] == recorded["test_accuracy"] and torch["test_samples"] == recorded["test_samples"]
    assert torch["input"] == {"name": "input", "shape": [8, 8], "kind": "image"}
    assert torch["labels"] == [str(i) for i in range(10)]
    assert [m["default"] for m in models] == [True, False]
    client.get("/predict/test/label")  # the first inference loads every served model in this process
    assert all(m["ready"] for m in client.get("/models").json["models"])


def test_a_picture_framed_for_a_model_then_inferred_matches_the_native_image_path(client: FlaskClient) -> None:
    picture = drawn_seven()
    framed = client.post("/models/digits-tf/versions/1/input", data=picture, content_type="image/png")
    assert framed.status_code == 200
    tensor = framed.json["input"]
    assert framed.json["model_name"] == "digits-tf" and framed.json["model_version"] == "1"
    assert tensor["name"] == "input" and tensor["shape"] == [1, 8, 8] and tensor["datatype"] == "UINT8"
    pixels = np.asarray(tensor["data"])
    assert pixels.shape == (64,) and pixels.min() == 0 and pixels.max() == 255
    inferred = client.post("/v2/models/digits-tf/infer", data=orjson.dumps({"inputs": [tensor]}),
                           content_type="application/json").json
    probabilities = next(o["data"] for o in inferred["outputs"] if o["name"] == "probabilities")
    native = client.post("/predict", data=picture, content_type="image/png").json["prediction"][0]
    assert np.allclose(probabilities, native, atol=5e-3)  # 8-bit pixels lose nothing that matters
    unversioned = client.post("/models/digits-tf/input", data=picture, content_type="application/octet-stream")
    assert unversioned.json == framed.json  # a file of unknown type is read the same way


def test_framing_refuses_what_it_cannot_use_in_words(client: FlaskClient) -> None:
    picture = drawn_seven()
    cases = [
        ("/models/digits-tf/input", b"plain text, no pixels", "application/octet-stream", 400, "not a readable image"),
        ("/models/digits-tf/input", picture, "text/plain", 415, "send the picture as the body"),
        ("/models/digits-tf/input", b"", "image/png", 400, "the image body is empty"),
        ("/models/no-such-model/input", picture, "image/png", 404, "no model 'no-such-model'"),
        ("/models/digits-tf/versions/7/input", picture, "image/png", 404, "has no version 7"),
        ("/models/digits-tf/versions/x1/input", picture, "image/png", 404, "versions are whole numbers"),
    ]
    for path, body, content_type, status, words in cases:
        answer = client.post(path, data=body, content_type=content_type)
        assert answer.status_code == status and words in answer.json["error"], (path, answer.json)


def test_the_data_calls_need_a_key_when_keys_are_on_and_the_pages_do_not(model_repo: Path) -> None:
    app = create_app(Settings.from_env({}, model_repository=model_repo, backend="onnx", workers=1, access_log=False,
                                       api_keys=KEY))
    try:
        client = app.test_client()
        assert client.get("/").status_code == 200 and client.get("/ops").status_code == 200
        assert client.get("/assets/app.js").status_code == 200
        assert client.get("/models").status_code == 401
        assert client.post("/models/digits-tf/input", data=drawn_seven(), content_type="image/png").status_code == 401
        assert client.get("/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    finally:
        service_of(app).close()


#: uPlot 1.6.32 from npm (sha512-KIMVnG68…xpiQIw==), as scripts/vendor-uplot.sh copies it: its minified IIFE build
#: and style sheet, unchanged. A new release: run the script, then put the sums it prints here.
UPLOT_FILES = {
    "uplot.js": "19c8d4c6ad88929a79f4ae49d6f7161566dfd0ba3d15cc495e974f787eb78f1f",
    "uplot.css": "df630c6a8d6f8eeaff264b50f73ce5b114f646ffd9a0bb74f049b0a00135fa04",
}


def test_the_chart_library_is_vendored_unchanged_with_its_licence_and_served_from_this_origin(
        client: FlaskClient) -> None:
    folder = Path(__file__).resolve().parents[2] / "serving" / "web"
    for name, digest in UPLOT_FILES.items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name
    assert "The MIT License" in (folder / "uplot-LICENSE.txt").read_text()
    assert (folder / "uplot.js").read_text().startswith("/*! https://github.com/leeoniya/uPlot (v1.6.32) */")
    page = client.get("/ops").get_data(as_text=True)
    assets = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert all(url.startswith("/") and not url.startswith("//") for url in assets), assets  # no CDN
    order = [url.split("?")[0] for url in assets if url.endswith(".js") or ".js?" in url]
    assert order == ["/assets/common.js", "/assets/uplot.js", "/assets/ops-metrics.js", "/assets/ops-charts.js",
                     "/assets/ops.js"]
    for name in ("uplot.js", "uplot.css", "ops-metrics.js", "ops-charts.js"):
        served = client.get(f"/assets/{name}")
        assert served.status_code == 200 and served.data == (folder / name).read_bytes(), name
    assert client.get("/assets/uplot-LICENSE.txt").status_code == 404  # shipped in the package, not served
