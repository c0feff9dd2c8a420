"""The web pages: the front page (draw or drop a digit, or fill in a feature model's form), the
operators' panel, and the two JSON calls they need.

    GET  /                                              the front page (serving/web/index.html)
    GET  /ops                                           the operators' panel (serving/web/ops.html)
    GET  /assets/{asset}                                the pages' scripts, styles and icon
    GET /models every served model: framework, version, accuracy, input POST
    /models/{name}[/versions/{version}]/input an uploaded picture as that model's input, 8-bit
    pixels

The page sends pictures (a drawing is a PNG of the canvas) to ``/models/{name}/input``, which frames
them exactly as every image upload is framed (``serving.protocol.inputs.batch_from_image``: MNIST's
20x20 box centred by mass, or optdigits' blocks), and answers the frame as a v2 UINT8 tensor; the
page then sends that tensor to ``/v2/models/{name}/infer``. So there is one implementation of the
framing, the page can show what the model sees, and every prediction goes through the same v2 path
(batcher, deadlines, metrics) as any client's.

The files are package data, read once per process; each carries an ETag (a 304 answers a matching
``If-None-Match``). The pages are ``no-cache`` (revalidated on every load) and name their assets
with
``?v=<etag>``, so an asset asked for by its current fingerprint may be cached for a year. Every page
and asset carries a Content-Security-Policy that allows the page's own origin only, with no inline
script or style.
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from importlib.resources import files
from typing import Any, NamedTuple

import numpy as np

from serving.backends import backend_class
from serving.errors import ModelNotFound, ServingError, UnsupportedMediaType
from serving.http.answers import Answer, json_answer
from serving.http.request import RequestState
from serving.protocol.inputs import IMAGE_TYPES, PIXELS_8BIT, batch_from_image
from serving.protocol.v2.routes import VERSION_PATTERN
from serving.runtime.service import InferenceService
from serving.store.repository import ModelMetadata

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self';"
    " object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
REVALIDATE, IMMUTABLE = "no-cache", "public, max-age=31536000, immutable"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
ASSET_PATTERN = re.compile(r"^[a-z0-9-]{1,40}\.(js|css|svg)$")
#: A picture may come as any advertised image type, or as bytes of unknown type (a file picked by a
#: user).
UPLOAD_TYPES = (*IMAGE_TYPES, "application/octet-stream")


class WebFile(NamedTuple):
    """One file of serving/web as it is served."""

    body: bytes
    content_type: str
    etag: str


@lru_cache(maxsize=1)
def web_files() -> dict[str, WebFile]:
    """Every file of serving/web by name; the pages with their asset URLs fingerprinted."""
    folder = files("serving") / "web"
    raw = {
        entry.name: entry.read_bytes()
        for entry in folder.iterdir()
        if entry.is_file() and f".{entry.name.rpartition('.')[2]}" in CONTENT_TYPES
    }
    tags = {name: hashlib.sha256(body).hexdigest()[:16] for name, body in raw.items()}

    def fingerprint(match: re.Match[bytes]) -> bytes:
        name = match.group(1).decode()
        return match.group(0) if name not in tags else f'"/assets/{name}?v={tags[name]}"'.encode()

    served = {}
    for name, body in raw.items():
        if name.endswith(".html"):
            body = re.sub(rb'"/assets/([a-z0-9.-]+)"', fingerprint, body)
        etag = f'"{hashlib.sha256(body).hexdigest()[:16]}"'
        served[name] = WebFile(body, CONTENT_TYPES[f".{name.rpartition('.')[2]}"], etag)
    return served


def _serve(request: RequestState, file: WebFile, cache_control: str) -> Answer:
    headers = {**PAGE_HEADERS, "ETag": file.etag, "Cache-Control": cache_control}
    if file.etag in (tag.strip() for tag in (request.header("If-None-Match") or "").split(",")):
        return Answer(304, b"", file.content_type, headers)
    return Answer(200, file.body, file.content_type, headers)


def index(request: RequestState, service: InferenceService) -> Answer:
    """``GET /``: the front page."""
    return _serve(request, web_files()["index.html"], REVALIDATE)


def ops(request: RequestState, service: InferenceService) -> Answer:
    """``GET /ops``: the operators' panel (the page is public; its data, ``/metrics``, is admin
    scope)."""
    return _serve(request, web_files()["ops.html"], REVALIDATE)


def asset(request: RequestState, service: InferenceService, asset: str) -> Answer:
    """``GET /assets/{asset}``: a script, style sheet or icon; cacheable for a year when asked
    for by fingerprint."""
    file = web_files().get(asset) if ASSET_PATTERN.match(asset) else None
    if file is None:
        raise ServingError(f"no asset {asset[:64]!r} here", 404)
    current = request.query == f"v={file.etag.strip(chr(34))}"
    return _serve(request, file, IMMUTABLE if current else REVALIDATE)


def models(request: RequestState, service: InferenceService) -> Answer:
    """``GET /models``: the served models, what they are and how well they did on held-out data."""
    entries = []
    for entry in service.index():  # served versions only, resolving the repository on first use
        meta, backend = service.served[(entry["name"], int(entry["version"]))]
        raw: dict[str, Any] = meta.raw
        entries.append(
            {
                "name": meta.name,
                "version": str(meta.version),
                "default": service.meta is not None
                and (meta.name, meta.version) == (service.meta.name, service.meta.version),
                "ready": entry["state"] == "READY",
                "framework": meta.framework,
                "backend": backend,
                "platform": backend_class(backend).platform,
                "arch": raw.get("arch"),
                "dataset": raw.get("dataset"),
                "accuracy": raw.get("test_accuracy"),
                "test_samples": raw.get("test_samples"),
                "input": _input(meta),
                "output": meta.output_name,
                "labels": meta.labels,
            }
        )
    return json_answer({"models": entries})


def _input(meta: ModelMetadata) -> dict[str, Any]:
    """What the front page needs of a model's input: an image's shape, or the feature form (each
    feature's name and training range, and the stored sample's values to start from)."""
    document: dict[str, Any] = {
        "name": meta.input_name,
        "shape": list(meta.input_shape),
        "kind": meta.input_kind,
    }
    if not meta.is_image:
        document["features"] = [
            {"name": feature.name, "range": None if feature.range is None else list(feature.range)}
            for feature in meta.features
        ] or [{"name": f"feature {i + 1}", "range": None} for i in range(meta.sample_size)]
        document["example"] = meta.sample()[0]
    return document


def model_input(
    request: RequestState, service: InferenceService, name: str, version: str | None = None
) -> Answer:
    """``POST /models/{name}[/versions/{version}]/input``: a picture framed as the model's input,
    0-255 pixels.

    The answer's ``input`` is a v2 input tensor, ready for ``/v2/models/{name}/infer``.
    """
    if version is not None and not VERSION_PATTERN.match(version):
        raise ModelNotFound(
            f"model {name!r} has no version {version[:32]!r}: versions are whole numbers"
        )
    key = service.key(name, int(version) if version is not None else None)
    meta = service.served[key][0]
    request.model = f"{key[0]}:{key[1]}"
    if request.mimetype not in UPLOAD_TYPES:
        raise UnsupportedMediaType(
            f"Content-Type {request.mimetype!r} is not accepted: send the picture as the body, as "
            "an image type"
            " (image/png, image/jpeg, ...) or application/octet-stream"
        )
    deadline = request.started + service.timeout_for(request.timeout())
    batch = batch_from_image(
        request.body(service.body_limit), meta, service.settings.max_image_pixels, deadline
    )
    low, high = meta.input_range
    pixels = np.rint((batch[0].astype(np.float64) - low) * (PIXELS_8BIT[1] / (high - low)))
    request.batch_size = 1
    return json_answer(
        {
            "model_name": meta.name,
            "model_version": str(meta.version),
            "input": {
                "name": meta.input_name,
                "shape": [1, *meta.input_shape],
                "datatype": "UINT8",
                "data": np.clip(pixels, *PIXELS_8BIT).astype(np.uint8).ravel(),
            },
        }
    )
