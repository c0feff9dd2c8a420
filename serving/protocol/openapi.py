"""The OpenAPI 3 document, generated from the endpoint table and served at ``GET /openapi.json``.

Each ``Endpoint`` carries its operation fragment, made with ``operation`` below: its success
response with a schema and every error status it can answer with (all ``{"error": "..."}``).
``document`` adds the summary, tag, scope and path parameters from the endpoint itself, so the
document can be validated (openapi-spec-validator) and a fuzzer can check the running server against
it (schemathesis), and a route can never be missing from it.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache
from typing import Any

from serving import __version__
from serving.http.routing import Endpoint
from serving.protocol.v2.codec import DATATYPES, HEADER_LENGTH
from serving.store.repository import NAME_PATTERN

Schema = dict[str, Any]
ERRORS = {
    400: "malformed body or protocol violation (shape, datatype, binary sizes, header values)",
    404: "no such model or version",
    413: "body over SERVING_MAX_BODY_BYTES, or image over SERVING_MAX_IMAGE_PIXELS",
    415: "a Content-Type (or Content-Encoding) the endpoint does not accept",
    422: "well-formed but unusable input: wrong shape, NaN, out of range, empty or oversized batch",
    409: "the change conflicts with what is served (a version not served or that fails its checks)",
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


STRING, INTEGER, NUMBER, BOOLEAN = (
    {"type": "string"},
    {"type": "integer"},
    {"type": "number"},
    {"type": "boolean"},
)
WORKER = {"type": "string", "description": "an opaque id of the worker process that answered"}
ID = {"oneOf": [STRING, INTEGER], "description": "the request's id, or its X-Request-ID"}
SAMPLES = {
    "anyOf": [
        NUMBER,
        {"type": "array", "items": {"anyOf": [NUMBER, {"type": "array", "items": NUMBER}]}},
    ]
}
VALUES = {"anyOf": [NUMBER, STRING, BOOLEAN, {"type": "array", "items": SAMPLES}]}
SCHEMAS: dict[str, Schema] = {
    "Error": obj(
        ["error"], error={"type": "string", "description": "what is wrong and how to fix it"}
    ),
    "PredictRequest": obj(
        ["data"],
        data=array(
            SAMPLES,
            description="one sample or a list of samples: for an image model H*W pixel values"
            " (flat or H x W), for a feature model a row of its N feature values (GET /metadata"
            " says which, and names the features)",
        ),
        id=ID,
        pixel_range=array(
            NUMBER,
            minItems=2,
            maxItems=2,
            description="the scale of the values, e.g. [0, 255] for"
            " 8-bit pixels; converted exactly to the model's input range (default: that range)",
        ),
    )
    | {"example": {"data": EXAMPLE_SAMPLE}},
    "ClassicRequest": obj(
        ["images"],
        images=array(
            SAMPLES, description="one H x W image (or a list of them) as 8-bit pixels, 0-255"
        ),
    )
    | {"example": {"images": [[0] * 8] * 8}},
    "Probabilities": obj(["prediction", "id"], prediction=array(array(NUMBER)), id=ID),
    "Labels": obj(["prediction", "id"], prediction=array(STRING), id=ID),
    "TestLabel": obj(
        ["prediction", "expected", "correct"],
        prediction=STRING,
        expected={
            "type": "string",
            "nullable": True,
            "description": "the stored sample's label; null when nobody knows it",
        },
        correct={"type": "boolean", "nullable": True},
        note={"type": "string", "description": "present when the label is unknown: how to record"},
    ),
    "TestProbabilities": obj(
        ["prediction", "expected", "correct"],
        prediction=array(NUMBER, description="one probability per label"),
        expected={"type": "string", "nullable": True},
        correct={"type": "boolean", "nullable": True},
        note=STRING,
    ),
    "LabelList": obj(["labels"], labels=array(STRING)),
    "Metadata": obj(
        ["name", "version", "framework", "backend", "mode", "input", "output", "labels"],
        name=STRING,
        version=INTEGER,
        framework=STRING,
        backend=STRING,
        mode=STRING,
        input=obj(
            ["kind", "name", "shape", "dtype", "range", "max_batch", "contract", "content_types"],
            kind={"type": "string", "enum": ["image", "features"]},
            name=STRING,
            shape=array(INTEGER, description="one sample: [H, W] of an image, [N] of features"),
            dtype=STRING,
            range=array(
                NUMBER,
                nullable=True,
                description="values outside are refused (422); null: no range is enforced",
            ),
            max_batch=INTEGER,
            contract=STRING,
            content_types=array(STRING),
            features=array(
                obj(
                    ["name", "range"],
                    name=STRING,
                    range=array(
                        NUMBER, nullable=True, description="seen in training (not enforced)"
                    ),
                ),
                description="a feature model's inputs, in order",
            ),
        ),
        output={"type": "object"},
        labels=array(STRING),
    ),
    "Health": obj(
        ["status", "model_loaded", "worker"],
        status=STRING,
        model_loaded=BOOLEAN,
        model={"type": "string", "nullable": True},
        version={"type": "integer", "nullable": True},
        worker=WORKER,
    ),
    "Status": obj(["status", "worker"], status=STRING, worker=WORKER),
    "ServerMetadata": obj(
        ["name", "version", "extensions"], name=STRING, version=STRING, extensions=array(STRING)
    ),
    "Live": obj(["live"], live=BOOLEAN),
    "Ready": obj(["ready"], ready=BOOLEAN),
    "ModelReady": obj(["name", "version", "ready"], name=STRING, version=STRING, ready=BOOLEAN),
    "TensorMetadata": obj(
        ["name", "datatype", "shape"], name=STRING, datatype=STRING, shape=array(INTEGER)
    ),
    "ModelMetadata": obj(
        ["name", "versions", "platform", "inputs", "outputs"],
        name=STRING,
        versions=array(STRING),
        platform=STRING,
        inputs=array(ref("TensorMetadata")),
        outputs=array(ref("TensorMetadata")),
    ),
    "RequestInput": obj(
        ["name", "shape", "datatype"],
        name=STRING,
        shape=array({"type": "integer", "minimum": 0}),
        datatype={"type": "string", "enum": list(DATATYPES)},
        parameters=obj([], binary_data_size={"type": "integer", "minimum": 0}),
        data=array(
            VALUES,
            description="row-major values, flat or nested; absent when binary_data_size is given",
        ),
    ),
    "RequestOutput": obj(["name"], name=STRING, parameters=obj([], binary_data=BOOLEAN)),
    "InferenceRequest": obj(
        ["inputs"],
        id=STRING,
        inputs=array(ref("RequestInput"), minItems=1),
        outputs=array(ref("RequestOutput")),
        parameters=obj(
            [],
            binary_data_output=BOOLEAN,
            timeout={"type": "integer", "description": "microseconds"},
        ),
    )
    | {
        "example": {
            "id": "1",
            "inputs": [
                {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": EXAMPLE_SAMPLE}
            ],
        }
    },
    "ResponseOutput": obj(
        ["name", "shape", "datatype"],
        name=STRING,
        shape=array(INTEGER),
        datatype=STRING,
        parameters=obj([], binary_data_size=INTEGER),
        data=array({"anyOf": [NUMBER, STRING]}),
    ),
    "InferenceResponse": obj(
        ["model_name", "model_version", "id", "outputs"],
        model_name=STRING,
        model_version=STRING,
        id=STRING,
        outputs=array(ref("ResponseOutput")),
    ),
    "ModelControl": obj(
        ["name", "loaded", "workers", "generation"],
        name=STRING,
        loaded=BOOLEAN,
        workers={"type": "integer", "description": "workers that applied the change"},
        generation=INTEGER,
    ),
    "TrafficChange": obj(
        ["name", "rule", "workers", "generation"],
        name=STRING,
        rule={"type": "string", "nullable": True, "description": "the rule in force; null: none"},
        workers={"type": "integer", "description": "workers that applied the change"},
        generation=INTEGER,
    ),
    "Traffic": obj(
        ["name", "rule", "window_s", "workers", "versions", "events"],
        name=STRING,
        rule={"type": "string", "nullable": True, "description": "e.g. v1 90%, v2 10%"},
        window_s={"type": "number", "description": "SERVING_TRAFFIC_WINDOW_S"},
        workers={"type": "integer", "description": "workers whose windows are added up"},
        versions=array(
            obj(
                ["version", "role", "percent", "requests", "errors", "error_rate"],
                version=STRING,
                role={"type": "string", "enum": ["stable", "candidate", "shadow"]},
                percent=NUMBER,
                requests=INTEGER,
                errors=INTEGER,
                error_rate=NUMBER,
                p50_ms={"type": "number", "nullable": True},
                p99_ms={"type": "number", "nullable": True},
                agreement={"type": "number", "description": "shadow: share of samples agreeing"},
                compared=INTEGER,
            )
        ),
        shadow=obj(
            ["version", "percent", "compared"],
            version=STRING,
            percent=NUMBER,
            compared=INTEGER,
            agreement={"type": "number", "nullable": True},
            latency_difference_ms=obj(
                [],
                p50={"type": "number", "nullable": True},
                p99={"type": "number", "nullable": True},
            ),
        ),
        events=array(
            obj(
                ["time", "model", "event"],
                time=STRING,
                model=STRING,
                event={"type": "string", "enum": ["set", "cleared", "rollback"]},
                rule=STRING,
                version=STRING,
                kind={"type": "string", "enum": ["errors", "latency"]},
                reason=STRING,
                worker=INTEGER,
            )
        ),
    ),
    "RepositoryIndex": array(
        obj(
            ["name", "version", "state"],
            name=STRING,
            version=STRING,
            reason=STRING,
            state={"type": "string", "enum": ["READY", "LOADING", "UNAVAILABLE"]},
        )
    ),
    "ModelConfig": obj(
        ["name", "max_batch_size", "input", "output"],
        name=STRING,
        platform=STRING,
        backend=STRING,
        version_policy=obj([], specific=obj(["versions"], versions=array(INTEGER))),
        max_batch_size={"type": "integer", "description": "SERVING_MAX_BATCH"},
        input=array(
            obj(
                ["name", "data_type", "dims"],
                name=STRING,
                data_type=STRING,
                format=STRING,
                dims=array(INTEGER, description="one sample, without the batch dimension"),
            )
        ),
        output=array(
            obj(
                ["name", "data_type", "dims"],
                name=STRING,
                data_type=STRING,
                dims=array(INTEGER),
                reshape=obj([], shape=array(INTEGER)),
            )
        ),
        dynamic_batching=obj(
            [],
            preferred_batch_size=array(INTEGER),
            max_queue_delay_microseconds=INTEGER,
        ),
        parameters={"type": "object"},
    ),
    "Duration": obj(["count", "ns"], count=INTEGER, ns=INTEGER),
    "ModelStats": obj(
        ["model_stats"],
        model_stats=array(
            obj(
                ["name", "version", "inference_count", "execution_count", "inference_stats"],
                name=STRING,
                version=STRING,
                last_inference={"type": "integer", "description": "ms since the epoch"},
                inference_count={"type": "integer", "description": "samples answered"},
                execution_count={"type": "integer", "description": "model calls"},
                inference_stats=obj(
                    ["success", "fail", "queue", "compute_infer"],
                    **{
                        part: ref("Duration")
                        for part in (
                            "success",
                            "fail",
                            "queue",
                            "compute_input",
                            "compute_infer",
                            "compute_output",
                            "cache_hit",
                            "cache_miss",
                        )
                    },
                ),
                batch_stats=array({"type": "object"}),
            )
        ),
    ),
    "ServedModel": obj(
        [
            "name",
            "version",
            "default",
            "ready",
            "framework",
            "backend",
            "platform",
            "input",
            "output",
            "labels",
        ],
        name=STRING,
        version=STRING,
        default={"type": "boolean", "description": "the native API's model"},
        ready={"type": "boolean", "description": "loaded in the worker that answered"},
        framework=STRING,
        backend=STRING,
        platform=STRING,
        arch={"type": "string", "nullable": True},
        dataset={"type": "string", "nullable": True},
        accuracy={
            "type": "number",
            "nullable": True,
            "description": "accuracy on the held-out test set",
        },
        test_samples={"type": "integer", "nullable": True, "description": "size of that test set"},
        input=obj(
            ["name", "shape", "kind"],
            name=STRING,
            shape=array(INTEGER, description="one sample: H x W, or N features"),
            kind={"type": "string", "enum": ["image", "features"]},
            features={"type": "array", "items": {"type": "object"}},
            example=array(NUMBER, description="a feature model's stored sample"),
        ),
        output=STRING,
        labels=array(STRING),
    ),
    "ModelList": obj(["models"], models=array(ref("ServedModel"))),
    "ModelInput": obj(
        ["model_name", "model_version", "input"],
        model_name=STRING,
        model_version=STRING,
        input=obj(
            ["name", "shape", "datatype", "data"],
            name=STRING,
            shape=array(INTEGER),
            datatype={"type": "string", "enum": ["UINT8"]},
            data=array(
                {"type": "integer", "minimum": 0, "maximum": 255},
                description="the framed picture, row-major 8-bit pixels: a v2 input tensor",
            ),
        ),
    ),
}
BINARY = {"type": "string", "format": "binary"}
BINARY_DESCRIPTION = (
    f"binary tensor data extension: the JSON header (its byte length in {HEADER_LENGTH}) followed "
    "by raw"
    " little-endian tensors"
)


def operation(
    ok: Schema | dict[str, Schema],
    errors: tuple[int, ...] = (),
    *,
    body: dict[str, Schema] | None = None,
    body_required: bool = True,
    params: tuple[Schema, ...] = (),
    ok_headers: Schema | None = None,
    description: str = "",
) -> Schema:
    """An endpoint's operation fragment: ``ok`` is the 200 JSON schema or a {media type: schema}
    map."""
    content = ok if "type" not in ok and "$ref" not in ok else {"application/json": ok}
    success: Schema = {
        "description": "success",
        "content": {media: {"schema": s} for media, s in content.items()},
    }
    if ok_headers:
        success["headers"] = ok_headers
    fragment: Schema = {"responses": {"200": success}}
    if description:
        fragment["description"] = description
    for status in errors:
        fragment["responses"][str(status)] = {"$ref": f"#/components/responses/E{status}"}
    if body:
        fragment["requestBody"] = {
            "required": body_required,
            "content": {m: {"schema": s} for m, s in body.items()},
        }
    if params:
        fragment["parameters"] = list(params)
    return fragment


def path_param(name: str, schema: Schema, description: str) -> Schema:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "schema": schema,
        "description": description,
    }


#: Every path variable an endpoint may use, documented once.
PATH_PARAMETERS = {
    "name": path_param(
        "name",
        {"type": "string", "pattern": NAME_PATTERN.pattern, "example": "digits-tf"},
        "model name",
    ),
    "version": path_param(
        "version", {"type": "string", "pattern": "^[0-9]{1,9}$", "example": "1"}, "model version"
    ),
    "asset": path_param(
        "asset",
        {"type": "string", "pattern": r"^[a-z0-9-]{1,40}\.(js|css|svg)$", "example": "app.js"},
        "a script, style sheet or icon of the web pages",
    ),
}
TIMEOUT = {
    "name": "X-Request-Timeout-Ms",
    "in": "header",
    "required": False,
    "description": "deadline (504 after)",
    "schema": {"type": "number", "minimum": 1, "maximum": 600000},
}
HEADER = {
    "name": HEADER_LENGTH,
    "in": "header",
    "required": False,
    "description": "JSON header length (binary)",
    "schema": {"type": "integer", "minimum": 1},
}


def _operation(endpoint: Endpoint) -> Schema:
    missing = [name for name in endpoint.variables if name not in PATH_PARAMETERS]
    if missing:
        raise ValueError(
            f"{endpoint.name}: document the path variable {missing[0]!r} in PATH_PARAMETERS"
        )
    fragment = dict(endpoint.doc or operation({"type": "object"}))
    parameters = [PATH_PARAMETERS[name] for name in endpoint.variables] + fragment.pop(
        "parameters", []
    )
    result: Schema = {
        "summary": endpoint.summary,
        "tags": [endpoint.tag],
        "x-scope": endpoint.scope,
        **fragment,
    }
    if parameters:
        result["parameters"] = parameters
    return result


@lru_cache(maxsize=8)
def document(endpoints: Iterable[Endpoint]) -> dict[str, Any]:
    """The whole OpenAPI 3.0 document for a (hashable) endpoint table; built once per table and
    process."""
    paths: dict[str, Schema] = {}
    for endpoint in endpoints:
        paths.setdefault(endpoint.openapi_path, {})[endpoint.method.lower()] = _operation(endpoint)
    responses = {
        f"E{status}": {
            "description": text,
            "content": {"application/json": {"schema": ref("Error")}},
        }
        for status, text in ERRORS.items()
    }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "serving",
            "version": __version__,
            "description": "Image classifiers behind a native JSON API and the Open Inference"
            " Protocol (v2)."
            ' Every error is {"error": "..."}; every response carries X-Request-ID.',
        },
        "paths": paths,
        "components": {"schemas": SCHEMAS, "responses": responses},
    }
