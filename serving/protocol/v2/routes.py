"""Open Inference Protocol (KServe v2) handlers: decode, call the service, encode.

    GET  /v2                                          server metadata and extensions
    GET  /v2/health/live, /v2/health/ready            200 when live / every served model is loaded
    GET  /v2/models/{name}[/versions/{version}]       model metadata (inputs/outputs, -1 = batch)
    GET  /v2/models/{name}[/versions/{version}]/ready 200 when that model is loaded in this worker
    POST /v2/models/{name}[/versions/{version}]/infer inference, JSON or binary tensors
    GET  /v2/models/{name}[/versions/{version}]/config Triton's model configuration
    GET  /v2/models[/{name}[/versions/{version}]]/stats Triton's statistics
    GET|POST /v2/repository/index                     every model version on disk with its state

The routes are declared in ``serving.protocol.endpoints``. Inference goes through the same service
as the native API: the same batcher, limits, deadlines and metrics. Unknown models and versions are
404; protocol violations 400; values the model cannot take (out of range, NaN, too many samples)
422, as in the native API. Errors are ``{"error": "..."}``.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from serving import __version__
from serving.errors import InvalidRequest, ModelNotFound, UnsupportedMediaType
from serving.http.answers import Answer, json_answer
from serving.http.request import RequestState
from serving.protocol.v2.codec import HEADER_LENGTH, decode_request, encode_response
from serving.protocol.v2.tensors import answer_decoded, model_metadata, output_tensors
from serving.protocol.v2.triton import model_config, statistics
from serving.runtime.model_control import ModelControl
from serving.runtime.service import InferenceService

#: Triton's names for the extensions served (the REST API; gRPC has all but binary_tensor_data).
EXTENSIONS = ["binary_tensor_data", "model_configuration", "statistics", "model_repository"]
VERSION_PATTERN = re.compile(r"^[0-9]{1,9}$")
BODY_TYPES = ("", "application/json", "application/octet-stream")


def version_of(name: str, version: str | None) -> int | None:
    """The version a path names (None: the latest served); 404 for anything but a number."""
    if version is None:
        return None
    if not VERSION_PATTERN.match(version):
        raise ModelNotFound(
            f"model {name!r} has no version {version[:32]!r}: versions are whole numbers"
        )
    return int(version)


def server_metadata(request: RequestState, service: InferenceService) -> Answer:
    return json_answer({"name": "serving", "version": __version__, "extensions": EXTENSIONS})


def live(request: RequestState, service: InferenceService) -> Answer:
    return json_answer({"live": True})


def ready(request: RequestState, service: InferenceService) -> Answer:
    if service.ready:
        return json_answer({"ready": True})
    return json_answer(
        {"ready": False, "error": "the models are not loaded in this worker yet"}, 503
    )


def metadata(
    request: RequestState, service: InferenceService, name: str, version: str | None = None
) -> Answer:
    model = service.model(name, version_of(name, version))
    request.model = model.label
    return json_answer(model_metadata(model, service.versions(name)))


def model_ready(
    request: RequestState, service: InferenceService, name: str, version: str | None = None
) -> Answer:
    key = service.key(name, version_of(name, version))
    request.model = f"{key[0]}:{key[1]}"
    body: dict[str, Any] = {
        "name": name,
        "version": str(key[1]),
        "ready": service.model_ready(*key),
    }
    if body["ready"]:
        return json_answer(body)
    return json_answer({**body, "error": f"model {name} is not loaded in this worker yet"}, 503)


def infer(
    request: RequestState, service: InferenceService, name: str, version: str | None = None
) -> Answer:
    """``POST /v2/models/{name}[/versions/{version}]/infer``: an unversioned request goes where
    the model's traffic rule sends it (``model_version`` says which version answered)."""
    route = service.route(name, version_of(name, version), request.header)
    request.model = route.label
    decoded = decode_request(_infer_body(request, service), request.header(HEADER_LENGTH))
    probabilities, model = answer_decoded(request, service, route, decoded)
    document = {
        "model_name": name,
        "model_version": str(model.meta.version),
        "id": decoded.id or request.request_id,
    }
    body, header_length = encode_response(document, output_tensors(decoded, model, probabilities))
    if header_length is None:
        return Answer(200, body)
    return Answer(200, body, "application/octet-stream", {HEADER_LENGTH: str(header_length)})


def config(
    request: RequestState, service: InferenceService, name: str, version: str | None = None
) -> Answer:
    """``GET /v2/models/{name}[/versions/{version}]/config``: Triton's model configuration."""
    model = service.model(name, version_of(name, version))
    request.model = model.label
    return json_answer(model_config(model, service.versions(name), service.settings))


def stats(
    request: RequestState,
    service: InferenceService,
    name: str | None = None,
    version: str | None = None,
) -> Answer:
    """``GET /v2/models[/{name}[/versions/{version}]]/stats``: Triton's statistics, summed over
    every worker."""
    return json_answer(
        {
            "model_stats": statistics(
                service, name, None if name is None else version_of(name, version)
            )
        }
    )


def repository_index(request: RequestState, service: InferenceService) -> Answer:
    """The served versions (all on disk for an admin key); a POST may filter with ``{"ready":
    true}`` (as Triton's).

    With explicit model control, each entry is what every worker reports
    (serving.runtime.model_control).
    """
    entries = service.index(unserved=request.admin)
    if service.settings.model_control == "explicit":
        entries = ModelControl.of(service).every_worker_index(entries, unserved=request.admin)
    body = request.body(service.body_limit) if request.method == "POST" else b""
    if body.strip():
        try:
            options = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise InvalidRequest(f"malformed JSON: {exc}") from None
        if not isinstance(options, dict) or not isinstance(options.get("ready", False), bool):
            raise InvalidRequest('the body must be a JSON object such as {"ready": true}')
        if options.get("ready"):
            entries = [entry for entry in entries if entry["state"] == "READY"]
    return json_answer(entries)


def load_model(request: RequestState, service: InferenceService, name: str) -> Answer:
    """``POST /v2/repository/models/{name}/load`` (explicit model control): on every worker, then
    answer."""
    return json_answer(
        ModelControl.of(service).load_or_unload(name, True, service.settings.timeout)
    )


def unload_model(request: RequestState, service: InferenceService, name: str) -> Answer:
    """``POST /v2/repository/models/{name}/unload``: every worker drains and unloads the model's
    versions."""
    return json_answer(
        ModelControl.of(service).load_or_unload(name, False, service.settings.timeout)
    )


def _infer_body(request: RequestState, service: InferenceService) -> bytes:
    """The infer body: JSON, binary or with no Content-Type at all (v2 clients often send none)."""
    mimetype = request.mimetype
    if mimetype not in BODY_TYPES and not mimetype.endswith("+json"):
        raise UnsupportedMediaType(
            f"Content-Type {mimetype!r} is not accepted: send application/json, "
            "application/octet-stream (binary"
            f" tensors with {HEADER_LENGTH}) or no Content-Type"
        )
    encoding = (request.header("Content-Encoding") or "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedMediaType(
            f"Content-Encoding {encoding[:32]!r} is not supported: send the body uncompressed"
        )
    return request.body(service.body_limit)
