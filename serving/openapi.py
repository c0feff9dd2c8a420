"""The OpenAPI 3 document for every endpoint, native and v2, served at ``GET /openapi.json``.

Built once from the small helpers below: each operation lists its success response with a schema and
every error status it can answer with (all ``{"error": "..."}``), so the document can be validated
(openapi-spec-validator) and a fuzzer can check the running server against it (schemathesis).
"""

from __future__ import annotations

from functools import cache
from typing import Any

from serving import __version__
from serving.protocol.v2.codec import DATATYPES, HEADER_LENGTH
from serving.repository import NAME_PATTERN

Schema = dict[str, Any]
ERRORS = {
    400: "malformed body or protocol violation (shape, datatype, binary sizes, header values)",
    404: "no such model or version",
    413: "body over SERVING_MAX_BODY_BYTES, or image over SERVING_MAX_IMAGE_PIXELS",
    415: "a Content-Type (or Content-Encoding) the endpoint does not accept",
    422: "well-formed but unusable input: wrong shape, NaN, out of range, empty or oversized batch",
    500: "the model failed; details are in the server log",
    503: "the model is not loaded in this worker, the queue is full or the server is stopping",
    504: "the request deadline passed before the model answered",
}
EXAMPLE_SAMPLE = [0.0] * 64


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def obj(required: list[str], **properties: Schema) -> Schema:
    schema: Schema = {"type": "object", "properties": properties}
    return schema | {"required": required} if required else schema


def array(items: Schema, **extra: Any) -> Schema:
    return {"type": "array", "items": items, **extra}


STRING, INTEGER, NUMBER, BOOLEAN = {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}
ID = {"oneOf": [STRING, INTEGER], "description": "the request's id, or its X-Request-ID"}
SAMPLES = {"anyOf": [NUMBER, {"type": "array", "items": {"anyOf": [NUMBER, {"type": "array", "items": NUMBER}]}}]}
VALUES = {"anyOf": [NUMBER, STRING, BOOLEAN, {"type": "array", "items": SAMPLES}]}
SCHEMAS: dict[str, Schema] = {
    "Error": obj(["error"], error={"type": "string", "description": "what is wrong and how to fix it"}),
    "PredictRequest": obj(
        ["data"], data=array(SAMPLES, description="one sample (H*W values, flat or H x W) or a list of samples"), id=ID,
    ) | {"example": {"data": EXAMPLE_SAMPLE}},
    "Probabilities": obj(["prediction", "id"], prediction=array(array(NUMBER)), id=ID),
    "Labels": obj(["prediction", "id"], prediction=array(STRING), id=ID),
    "TestLabel": obj(["prediction", "expected", "correct"], prediction=STRING, expected=STRING, correct=BOOLEAN),
    "LabelList": obj(["labels"], labels=array(STRING)),
    "Metadata": obj(["name", "version", "framework", "backend", "mode", "input", "output", "labels"],
                    name=STRING, version=INTEGER, framework=STRING, backend=STRING, mode=STRING,
                    input={"type": "object"}, output={"type": "object"}, labels=array(STRING)),
    "Health": obj(["status", "model_loaded", "pid"], status=STRING, model_loaded=BOOLEAN,
                  model={"type": "string", "nullable": True}, version={"type": "integer", "nullable": True},
                  pid=INTEGER),
    "Status": obj(["status", "pid"], status=STRING, pid=INTEGER),
    "ServerMetadata": obj(["name", "version", "extensions"], name=STRING, version=STRING, extensions=array(STRING)),
    "Live": obj(["live"], live=BOOLEAN),
    "Ready": obj(["ready"], ready=BOOLEAN),
    "ModelReady": obj(["name", "version", "ready"], name=STRING, version=STRING, ready=BOOLEAN),
    "TensorMetadata": obj(["name", "datatype", "shape"], name=STRING, datatype=STRING, shape=array(INTEGER)),
    "ModelMetadata": obj(["name", "versions", "platform", "inputs", "outputs"], name=STRING,
                         versions=array(STRING), platform=STRING, inputs=array(ref("TensorMetadata")),
                         outputs=array(ref("TensorMetadata"))),
    "RequestInput": obj(
        ["name", "shape", "datatype"], name=STRING, shape=array({"type": "integer", "minimum": 0}),
        datatype={"type": "string", "enum": list(DATATYPES)},
        parameters=obj([], binary_data_size={"type": "integer", "minimum": 0}),
        data=array(VALUES, description="row-major values, flat or nested; absent when binary_data_size is given"),
    ),
    "RequestOutput": obj(["name"], name=STRING, parameters=obj([], binary_data=BOOLEAN)),
    "InferenceRequest": obj(
        ["inputs"], id=STRING, inputs=array(ref("RequestInput"), minItems=1), outputs=array(ref("RequestOutput")),
        parameters=obj([], binary_data_output=BOOLEAN, timeout={"type": "integer", "description": "microseconds"}),
    ) | {"example": {"id": "1", "inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                            "data": EXAMPLE_SAMPLE}]}},
    "ResponseOutput": obj(["name", "shape", "datatype"], name=STRING, shape=array(INTEGER), datatype=STRING,
                          parameters=obj([], binary_data_size=INTEGER), data=array({"anyOf": [NUMBER, STRING]})),
    "InferenceResponse": obj(["model_name", "model_version", "id", "outputs"], model_name=STRING,
                             model_version=STRING, id=STRING, outputs=array(ref("ResponseOutput"))),
    "RepositoryIndex": array(obj(["name", "version", "state"], name=STRING, version=STRING, reason=STRING,
                                 state={"type": "string", "enum": ["READY", "LOADING", "UNAVAILABLE"]})),
}
BINARY = {"type": "string", "format": "binary"}
BINARY_DESCRIPTION = (
    f"binary tensor data extension: the JSON header (its byte length in {HEADER_LENGTH}) followed by raw"
    " little-endian tensors"
)


def op(summary: str, ok: Schema | dict[str, Schema], errors: tuple[int, ...] = (), *, tag: str,
       body: dict[str, Schema] | None = None, body_required: bool = True, params: tuple[Schema, ...] = (),
       ok_headers: Schema | None = None, description: str = "") -> Schema:
    """One operation: ``ok`` is the 200 JSON schema or a {media type: schema} map."""
    content = ok if "type" not in ok and "$ref" not in ok else {"application/json": ok}
    success: Schema = {"description": "success", "content": {media: {"schema": s} for media, s in content.items()}}
    if ok_headers:
        success["headers"] = ok_headers
    operation: Schema = {"summary": summary, "tags": [tag], "responses": {"200": success}}
    if description:
        operation["description"] = description
    for status in errors:
        operation["responses"][str(status)] = {"$ref": f"#/components/responses/E{status}"}
    if body:
        operation["requestBody"] = {"required": body_required, "content": {m: {"schema": s} for m, s in body.items()}}
    if params:
        operation["parameters"] = list(params)
    return operation


def path_param(name: str, schema: Schema, description: str) -> Schema:
    return {"name": name, "in": "path", "required": True, "schema": schema, "description": description}


NAME = path_param("name", {"type": "string", "pattern": NAME_PATTERN.pattern, "example": "digits-tf"}, "model name")
VERSION = path_param("version", {"type": "string", "pattern": "^[0-9]{1,9}$", "example": "1"}, "model version")
TIMEOUT = {"name": "X-Request-Timeout-Ms", "in": "header", "required": False, "description": "deadline (504 after)",
           "schema": {"type": "number", "minimum": 1, "maximum": 600000}}
HEADER = {"name": HEADER_LENGTH, "in": "header", "required": False, "description": "JSON header length (binary)",
          "schema": {"type": "integer", "minimum": 1}}
PREDICT_BODY = {"application/json": ref("PredictRequest"), "image/png": BINARY, "image/jpeg": BINARY,
                "multipart/form-data": obj(["file"], file=BINARY)}
PREDICT_ERRORS = (400, 413, 415, 422, 500, 503, 504)


def _model_paths(suffix: str, method: str, make: Any) -> dict[str, Schema]:
    """The same operation with and without ``/versions/{version}``."""
    return {
        f"/v2/models/{{name}}{suffix}": {method: make((NAME,))},
        f"/v2/models/{{name}}/versions/{{version}}{suffix}": {method: make((NAME, VERSION))},
    }


def _paths() -> dict[str, Schema]:
    native, ops, v2, docs = "native", "operations", "v2 (Open Inference Protocol)", "documentation"
    infer = {"application/json": ref("InferenceRequest"), "application/octet-stream": BINARY}
    paths: dict[str, Schema] = {
        "/health": {"get": op("liveness and whether this worker's model is loaded", ref("Health"), tag=ops)},
        "/health/live": {"get": op("200 while the worker answers", ref("Status"), tag=ops)},
        "/health/ready": {"get": op("200 once this worker's models are loaded", ref("Status"), (503,), tag=ops)},
        "/metrics": {"get": op("Prometheus text, merged across workers", {"text/plain": STRING}, tag=ops)},
        "/metadata": {"get": op("default model metadata and input contract", ref("Metadata"), (503,), tag=native)},
        "/label": {"get": op("the default model's labels", ref("LabelList"), (503,), tag=native)},
        "/predict": {"post": op("class probabilities per sample", ref("Probabilities"), PREDICT_ERRORS, tag=native,
                                body=PREDICT_BODY, params=(TIMEOUT,))},
        "/predict/label": {"post": op("most probable label per sample", ref("Labels"), PREDICT_ERRORS, tag=native,
                                      body=PREDICT_BODY, params=(TIMEOUT,))},
        "/predict/test/label": {"get": op("run the model's stored sample (smoke test)", ref("TestLabel"),
                                          (500, 503, 504), tag=native)},
        "/v2": {"get": op("server metadata", ref("ServerMetadata"), tag=v2)},
        "/v2/health/live": {"get": op("server liveness", ref("Live"), tag=v2)},
        "/v2/health/ready": {"get": op("every served model loaded in this worker", ref("Ready"), (503,), tag=v2)},
        "/v2/repository/index": {
            "get": op("every model version on disk with its state", ref("RepositoryIndex"), (503,), tag=v2),
            "post": op("the index, optionally only ready versions (Triton style)", ref("RepositoryIndex"),
                       (400, 413, 503), tag=v2, body={"application/json": obj([], ready=BOOLEAN)}, body_required=False),
        },
        "/openapi.json": {"get": op("this document", {"type": "object"}, tag=docs)},
        "/docs": {"get": op("this document as HTML", {"text/html": STRING}, tag=docs)},
    }
    paths.update(_model_paths("", "get", lambda p: op("model metadata", ref("ModelMetadata"), (404, 503), tag=v2,
                                                       params=p)))
    paths.update(_model_paths("/ready", "get", lambda p: op("model readiness in this worker", ref("ModelReady"),
                                                            (404, 503), tag=v2, params=p)))
    paths.update(_model_paths("/infer", "post", lambda p: op(
        "inference", {"application/json": ref("InferenceResponse"), "application/octet-stream": BINARY},
        (400, 404, 413, 415, 422, 500, 503, 504), tag=v2, body=infer, params=(*p, HEADER, TIMEOUT),
        ok_headers={HEADER_LENGTH: {"description": "JSON header length of a binary response",
                                    "schema": INTEGER}},
        description=f"JSON or {BINARY_DESCRIPTION}; the body may come with no Content-Type.",
    )))
    return paths


@cache
def document() -> dict[str, Any]:
    """The whole OpenAPI 3.0 document (built once per process)."""
    responses = {f"E{status}": {"description": text, "content": {"application/json": {"schema": ref("Error")}}}
                 for status, text in ERRORS.items()}
    return {
        "openapi": "3.0.3",
        "info": {"title": "serving", "version": __version__,
                 "description": "Image classifiers behind a native JSON API and the Open Inference Protocol (v2)."
                                " Every error is {\"error\": \"...\"}; every response carries X-Request-ID."},
        "paths": _paths(),
        "components": {"schemas": SCHEMAS, "responses": responses},
    }
