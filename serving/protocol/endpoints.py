"""The endpoint table: every route the server answers, declared once.

Flask's URL rules, the direct-route matcher, the ``endpoint`` metric label, the OpenAPI document and
the endpoint table in docs/api.md are all generated from ``ENDPOINTS`` (see
``serving.http.routing``). Adding an endpoint is one entry here plus its handler, a function
``handler(request, service, **path_variables) -> Answer`` that never imports Flask.
"""

from __future__ import annotations

from serving.http.routing import Endpoint
from serving.protocol import classic, docs, native, ops, web
from serving.protocol.openapi import (
    BINARY,
    BINARY_DESCRIPTION,
    BOOLEAN,
    HEADER,
    HEADER_LENGTH,
    INTEGER,
    STRING,
    TIMEOUT,
    obj,
    operation,
    ref,
)
from serving.protocol.stream import LINE, NDJSON, predict_stream
from serving.protocol.v2 import routes as v2
from serving.protocol.v2 import traffic

NATIVE, OPS, V2, DOCS = "native", "operations", "v2 (Open Inference Protocol)", "documentation"
CLASSIC = "classic MNIST client"
PREDICT_BODY = {
    "application/json": ref("PredictRequest"),
    "image/png": BINARY,
    "image/jpeg": BINARY,
    "multipart/form-data": obj(["file"], file=BINARY),
}
PREDICT_ERRORS = (400, 413, 415, 422, 500, 503, 504)
CLASSIC_BODY = {"application/json": ref("ClassicRequest")}
INDICES = {"oneOf": [INTEGER, {"type": "array", "items": INTEGER}]}
INFER = operation(
    {"application/json": ref("InferenceResponse"), "application/octet-stream": BINARY},
    (400, 404, 413, 415, 422, 500, 503, 504),
    body={"application/json": ref("InferenceRequest"), "application/octet-stream": BINARY},
    params=(HEADER, TIMEOUT),
    ok_headers={
        HEADER_LENGTH: {"description": "JSON header length of a binary response", "schema": INTEGER}
    },
    description=f"JSON or {BINARY_DESCRIPTION}; the body may come with no Content-Type.",
)
MODEL_METADATA = operation(ref("ModelMetadata"), (404, 503))
MODEL_READY = operation(ref("ModelReady"), (404, 503))
MODEL_CONFIG = operation(ref("ModelConfig"), (404, 503))
MODEL_STATS = operation(ref("ModelStats"), (404, 503))
WEB = "web pages"
NOT_MODIFIED = {"description": "not modified: the ETag sent in If-None-Match is current"}
PAGE = operation({"text/html": STRING})
PAGE["responses"]["304"] = NOT_MODIFIED
ASSET = operation({"text/javascript": STRING, "text/css": STRING, "image/svg+xml": STRING})
ASSET["responses"] |= {
    "304": NOT_MODIFIED,
    "404": {
        "description": "no such asset",
        "content": {"application/json": {"schema": ref("Error")}},
    },
}
MODEL_INPUT = operation(
    ref("ModelInput"),
    (400, 404, 413, 415, 503),
    body={media: BINARY for media in web.UPLOAD_TYPES},
    description="The picture framed as every image upload is (see"
    " serving/protocol/preprocess.py), as a v2 UINT8 input tensor for"
    " /v2/models/{name}/infer.",
)

ENDPOINTS: tuple[Endpoint, ...] = (
    # operations: probes stay open to orchestrators; metrics are for operators
    Endpoint(
        "GET",
        "/health",
        ops.health,
        "liveness and whether this worker's model is loaded",
        OPS,
        scope="public",
        doc=operation(ref("Health")),
    ),
    Endpoint(
        "GET",
        "/health/live",
        ops.live,
        "200 while the worker answers",
        OPS,
        scope="public",
        doc=operation(ref("Status")),
    ),
    Endpoint(
        "GET",
        "/health/ready",
        ops.ready,
        "200 once this worker's models are loaded",
        OPS,
        scope="public",
        doc=operation(ref("Status"), (503,)),
    ),
    Endpoint(
        "GET",
        "/metrics",
        ops.metrics,
        "Prometheus text, merged across workers",
        OPS,
        scope="admin",
        doc=operation({"text/plain": STRING}),
    ),
    # the native API
    Endpoint(
        "GET",
        "/metadata",
        native.metadata,
        "default model metadata and input contract",
        NATIVE,
        doc=operation(ref("Metadata"), (503,)),
    ),
    Endpoint(
        "GET",
        "/label",
        native.labels,
        "the default model's labels",
        NATIVE,
        doc=operation(ref("LabelList"), (503,)),
    ),
    Endpoint(
        "POST",
        "/predict",
        native.predict,
        "class probabilities per sample",
        NATIVE,
        direct=True,
        doc=operation(ref("Probabilities"), PREDICT_ERRORS, body=PREDICT_BODY, params=(TIMEOUT,)),
    ),
    Endpoint(
        "POST",
        "/predict/label",
        native.predict_label,
        "most probable label per sample",
        NATIVE,
        direct=True,
        doc=operation(ref("Labels"), PREDICT_ERRORS, body=PREDICT_BODY, params=(TIMEOUT,)),
    ),
    Endpoint(
        "GET",
        "/predict/test/label",
        native.test_label,
        "run the model's stored sample (smoke test): its label and whether it is the sample's",
        NATIVE,
        doc=operation(ref("TestLabel"), (500, 503, 504)),
    ),
    Endpoint(
        "GET",
        "/predict/test",
        native.test_probabilities,
        "the model's probabilities for its stored sample",
        NATIVE,
        doc=operation(ref("TestProbabilities"), (500, 503, 504)),
    ),
    # the classic Flask MNIST client contract (unchanged clients)
    Endpoint(
        "POST",
        "/inference",
        classic.inference_text,
        "the label index as plain text (one per line for a batch)",
        CLASSIC,
        direct=True,
        doc=operation({"text/plain": STRING}, PREDICT_ERRORS, body=CLASSIC_BODY, params=(TIMEOUT,)),
    ),
    Endpoint(
        "POST",
        "/inference/",
        classic.inference_json,
        "the label index as a JSON number (an array for a batch)",
        CLASSIC,
        direct=True,
        doc=operation(
            {"application/json": INDICES}, PREDICT_ERRORS, body=CLASSIC_BODY, params=(TIMEOUT,)
        ),
    ),
    # the Open Inference Protocol (v2)
    Endpoint(
        "GET",
        "/v2",
        v2.server_metadata,
        "server metadata",
        V2,
        doc=operation(ref("ServerMetadata")),
    ),
    Endpoint(
        "GET",
        "/v2/health/live",
        v2.live,
        "server liveness",
        V2,
        scope="public",
        doc=operation(ref("Live")),
    ),
    Endpoint(
        "GET",
        "/v2/health/ready",
        v2.ready,
        "every served model loaded in this worker",
        V2,
        scope="public",
        doc=operation(ref("Ready"), (503,)),
    ),
    Endpoint("GET", "/v2/models/<name>", v2.metadata, "model metadata", V2, doc=MODEL_METADATA),
    Endpoint(
        "GET",
        "/v2/models/<name>/versions/<version>",
        v2.metadata,
        "model metadata",
        V2,
        doc=MODEL_METADATA,
    ),
    Endpoint(
        "GET",
        "/v2/models/<name>/ready",
        v2.model_ready,
        "model readiness in this worker",
        V2,
        doc=MODEL_READY,
    ),
    Endpoint(
        "GET",
        "/v2/models/<name>/versions/<version>/ready",
        v2.model_ready,
        "model readiness in this worker",
        V2,
        doc=MODEL_READY,
    ),
    Endpoint("POST", "/v2/models/<name>/infer", v2.infer, "inference", V2, direct=True, doc=INFER),
    Endpoint(
        "POST",
        "/v2/models/<name>/versions/<version>/infer",
        v2.infer,
        "inference",
        V2,
        direct=True,
        doc=INFER,
    ),
    # Triton's model-configuration and statistics extensions (serving/protocol/v2/triton.py)
    Endpoint(
        "GET",
        "/v2/models/<name>/config",
        v2.config,
        "model configuration (Triton's extension)",
        V2,
        doc=MODEL_CONFIG,
    ),
    Endpoint(
        "GET",
        "/v2/models/<name>/versions/<version>/config",
        v2.config,
        "model configuration (Triton's extension)",
        V2,
        doc=MODEL_CONFIG,
    ),
    Endpoint(
        "GET",
        "/v2/models/stats",
        v2.stats,
        "statistics of every served version (Triton's extension)",
        V2,
        doc=MODEL_STATS,
    ),
    Endpoint(
        "GET",
        "/v2/models/<name>/stats",
        v2.stats,
        "statistics of a model's versions (Triton's extension)",
        V2,
        doc=MODEL_STATS,
    ),
    Endpoint(
        "GET",
        "/v2/models/<name>/versions/<version>/stats",
        v2.stats,
        "statistics of one version (Triton's extension)",
        V2,
        doc=MODEL_STATS,
    ),
    Endpoint(
        "GET",
        "/v2/repository/index",
        v2.repository_index,
        "every model version on disk with its state",
        V2,
        scope="admin",
        doc=operation(ref("RepositoryIndex"), (503,)),
    ),
    Endpoint(
        "POST",
        "/v2/repository/index",
        v2.repository_index,
        "the index, optionally only ready versions (Triton style)",
        V2,
        scope="admin",
        doc=operation(
            ref("RepositoryIndex"),
            (400, 413, 503),
            body={"application/json": obj([], ready=BOOLEAN)},
            body_required=False,
        ),
    ),
    Endpoint(
        "POST",
        "/v2/repository/models/<name>/load",
        v2.load_model,
        "load a model on every worker (SERVING_MODEL_CONTROL=explicit)",
        V2,
        scope="admin",
        doc=operation(ref("ModelControl"), (400, 404, 500)),
    ),
    Endpoint(
        "POST",
        "/v2/repository/models/<name>/unload",
        v2.unload_model,
        "drain and unload a model on every worker (SERVING_MODEL_CONTROL=explicit)",
        V2,
        scope="admin",
        doc=operation(ref("ModelControl"), (400, 404, 500)),
    ),
    # canary and shadow traffic between versions (serving/protocol/v2/traffic.py)
    Endpoint(
        "GET",
        "/v2/repository/models/<name>/traffic",
        traffic.traffic_status,
        "the model's traffic rule, each version's window, the shadow's agreement, events",
        V2,
        scope="admin",
        doc=operation(ref("Traffic"), (404,)),
    ),
    Endpoint(
        "POST",
        "/v2/repository/models/<name>/traffic",
        traffic.set_traffic,
        "share the model's unversioned requests between its versions, on every worker",
        V2,
        scope="admin",
        doc=operation(
            ref("TrafficChange"),
            (400, 404, 409, 413, 422, 500),
            body={"application/json": traffic.RULE_BODY},
        ),
    ),
    Endpoint(
        "DELETE",
        "/v2/repository/models/<name>/traffic",
        traffic.clear_traffic,
        "drop the model's traffic rule on every worker",
        V2,
        scope="admin",
        doc=operation(ref("TrafficChange"), (404, 500)),
    ),
    # documentation
    Endpoint(
        "GET",
        "/openapi.json",
        docs.openapi,
        "this document",
        DOCS,
        scope="public",
        doc=operation({"type": "object"}),
    ),
    Endpoint(
        "GET",
        "/docs",
        docs.html_docs,
        "this document as HTML",
        DOCS,
        scope="public",
        doc=operation({"text/html": STRING}),
    ),
    # the web pages: the front page and the operators' panel are public; their data calls are not
    Endpoint(
        "GET",
        "/",
        web.index,
        "the front page: draw or drop a digit, see the answer",
        WEB,
        scope="public",
        doc=PAGE,
    ),
    Endpoint(
        "GET",
        "/ops",
        web.ops,
        "the operators' panel (its data is /metrics, admin scope)",
        WEB,
        scope="public",
        doc=PAGE,
    ),
    Endpoint(
        "GET",
        "/assets/<asset>",
        web.asset,
        "the pages' scripts, styles and icon",
        WEB,
        scope="public",
        doc=ASSET,
    ),
    Endpoint(
        "GET",
        "/models",
        web.models,
        "served models: framework, version, held-out accuracy, input size",
        WEB,
        doc=operation(ref("ModelList"), (503,)),
    ),
    Endpoint(
        "POST",
        "/models/<name>/input",
        web.model_input,
        "a picture framed as the model's input (8-bit)",
        WEB,
        doc=MODEL_INPUT,
    ),
    Endpoint(
        "POST",
        "/models/<name>/versions/<version>/input",
        web.model_input,
        "a picture framed as that version's input (8-bit)",
        WEB,
        doc=MODEL_INPUT,
    ),
    # streaming (issue 16): sent line by line by the ASGI front, whole by the WSGI app
    # (serving/protocol/stream.py)
    Endpoint(
        "POST",
        "/predict/stream",
        predict_stream,
        "one NDJSON line per sample, streamed as each is ready",
        NATIVE,
        direct=True,
        doc=operation(
            {NDJSON: LINE},
            PREDICT_ERRORS,
            body=PREDICT_BODY,
            params=(TIMEOUT,),
            description="Under SERVING_FRONT=asgi each line is sent as soon as its sample is"
            " classified (the model runs chunks of 1, 2, 4, ... samples); the WSGI front"
            " sends the same lines at once. A stream that fails after its first line"
            ' ends with a line {"error": ...}.',
        ),
    ),
)
