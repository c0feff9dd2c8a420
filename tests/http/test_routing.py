"""The endpoint table and the settings declarations: everything generated from them, and adding to them.

A throwaway endpoint and a throwaway setting, declared here the way a contributor would (one table
entry plus its handler; one declaration), must show up in Flask's routing, the direct matcher, the
OpenAPI document, the metrics, and the generated docs, with no other change anywhere.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from openapi_spec_validator import validate

from serving.config import Settings, setting
from serving.errors import ConfigError, InvalidInput
from serving.fronts.dispatch import WsgiRequest, direct_route
from serving.fronts.wsgi import create_app
from serving.http.answers import Answer, json_answer
from serving.http.request import RequestState
from serving.http.routing import Endpoint, Router
from serving.observability.metrics import TALLY
from serving.protocol.endpoints import ENDPOINTS
from serving.protocol.openapi import document, operation
from serving.runtime.service import InferenceService
from serving.tools import docgen

ROOT = Path(__file__).resolve().parents[2]


def echo(request: RequestState, service: InferenceService, name: str) -> Answer:
    """A throwaway handler: echoes its path variable, refuses 'bad' with the usual error shape."""
    if name == "bad":
        raise InvalidInput("bad is not a name")
    return json_answer({"name": name, "id": request.request_id})


ECHO = Endpoint("GET", "/echo/<name>", echo, "echo a name (test only)", "test", scope="public",
                doc=operation({"type": "object"}, (422,)))
ECHO_DIRECT = Endpoint("POST", "/echo/<name>", echo, "echo a name, directly (test only)", "test", direct=True,
                       doc=operation({"type": "object"}, (422,)))


@pytest.mark.parametrize(("method", "path", "length", "endpoint"), [
    ("POST", "/predict", "10", "/predict"),
    ("POST", "/predict/label", "0", "/predict/label"),
    ("POST", "/v2/models/digits-torch/infer", "5", "/v2/models/<name>/infer"),
    ("POST", "/v2/models/m/versions/3/infer", "5", "/v2/models/<name>/versions/<version>/infer"),
    ("POST", "/predict/", "10", None),  # Flask's routing decides what a trailing slash means
    ("POST", "/predict", None, None),  # chunked
    ("POST", "/predict", "\u00b2", None),  # a digit to str.isdigit, not to int()
    ("GET", "/predict", "10", None),
    ("HEAD", "/predict", "10", None),
    ("OPTIONS", "/v2/models/m/infer", "10", None),
    ("POST", "/v2/models//infer", "5", None),
    ("POST", "/v2/models/m/versions//infer", "5", None),
    ("POST", "/v2/models/m/v/3/infer", "5", None),
    ("POST", "/v2/models/caf\u00c3\u00a9/infer", "5", None),  # non-ASCII (UTF-8 seen as latin-1): Flask decodes it
    ("GET", "/health", None, None),  # not marked direct: Flask serves it
])
def test_which_requests_take_the_direct_route(method: str, path: str, length: str | None,
                                              endpoint: str | None) -> None:
    environ: dict[str, Any] = {"REQUEST_METHOD": method, "PATH_INFO": path}
    if length is not None:
        environ["CONTENT_LENGTH"] = length
    route = direct_route(Router(ENDPOINTS), WsgiRequest(environ))
    assert (route[0].metric_label if route else None) == endpoint


def test_path_variables_come_from_the_matched_segments() -> None:
    router = Router(ENDPOINTS)
    route = router.match_direct("POST", "/v2/models/digits-tf/versions/12/infer")
    assert route is not None and route[1] == {"name": "digits-tf", "version": "12"}


def test_the_compiled_matcher_is_cheap() -> None:
    """Not a benchmark: a guard that the matcher stays a lookup (werkzeug's costs ~6.5 us a match)."""
    router = Router(ENDPOINTS)
    started = time.perf_counter()
    for _ in range(10_000):
        router.match_direct("POST", "/v2/models/digits-tf/infer")
    assert (time.perf_counter() - started) / 10_000 < 20e-6


def test_bad_declarations_are_refused() -> None:
    with pytest.raises(ValueError, match="declared twice"):
        Router((ECHO, ECHO))
    with pytest.raises(ValueError, match="a path is /segment"):
        Endpoint("GET", "/x y", echo, "s", "t")
    with pytest.raises(ValueError, match="method must be one of"):
        Endpoint("FETCH", "/x", echo, "s", "t")
    with pytest.raises(ValueError, match="scope must be"):
        Endpoint("GET", "/x", echo, "s", "t", scope="root")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="document the path variable 'thing'"):
        document((Endpoint("GET", "/x/<thing>", echo, "s", "t"),))


def test_every_endpoint_appears_in_the_openapi_document_and_the_docs_table() -> None:
    doc = document(ENDPOINTS)
    table = docgen.endpoints_markdown(ENDPOINTS)
    for endpoint in ENDPOINTS:
        operation_doc = doc["paths"][endpoint.openapi_path][endpoint.method.lower()]
        assert operation_doc["summary"] == endpoint.summary and operation_doc["x-scope"] == endpoint.scope
        assert f"| {endpoint.method} | `{endpoint.path}` | {endpoint.scope} |" in table


def test_a_new_endpoint_is_one_table_entry_plus_its_handler(model_repo: Path) -> None:
    endpoints = (*ENDPOINTS, ECHO, ECHO_DIRECT)
    app = create_app(Settings.from_env({}, model_repository=model_repo, backend="onnx", access_log=False),
                     endpoints=endpoints)
    client = app.test_client()
    TALLY.flush()
    before = client.get("/metrics").get_data(as_text=True)
    # routing: Flask for the GET, the direct dispatcher for the POST; errors in the usual shape
    answer = client.get("/echo/alice", headers={"X-Request-ID": "echo-1"})
    assert answer.status_code == 200 and answer.json == {"name": "alice", "id": "echo-1"}
    assert answer.headers["X-Request-ID"] == "echo-1"
    assert direct_route(Router(endpoints), WsgiRequest({"REQUEST_METHOD": "POST", "PATH_INFO": "/echo/bob",
                                                         "CONTENT_LENGTH": "0"})) is not None
    posted = client.post("/echo/bob", data=b"")
    assert posted.status_code == 200 and posted.json["name"] == "bob"
    refused = client.get("/echo/bad")
    assert refused.status_code == 422 and refused.json == {"error": "bad is not a name"}
    assert client.delete("/echo/alice").status_code == 405
    # OpenAPI: the path, its parameter (documented once, in PATH_PARAMETERS) and its errors
    doc = client.get("/openapi.json").json
    validate(doc)
    get = doc["paths"]["/echo/{name}"]["get"]
    assert get["summary"] == "echo a name (test only)" and [p["name"] for p in get["parameters"]] == ["name"]
    assert set(get["responses"]) == {"200", "422"} and "post" in doc["paths"]["/echo/{name}"]
    assert "/echo/{name}" in client.get("/docs").get_data(as_text=True)
    # metrics: labelled by the pattern, never the raw path
    after = client.get("/metrics").get_data(as_text=True)
    assert 'endpoint="/echo/<name>",method="GET",status="200"' in after
    assert 'endpoint="/echo/<name>",method="POST",status="200"' in after
    assert "/echo/alice" not in after and 'endpoint="/echo/<name>"' not in before
    # the generated docs
    assert "| GET | `/echo/<name>` | public | echo a name (test only) |" in docgen.endpoints_markdown(endpoints)


def test_a_new_setting_is_one_declaration() -> None:
    @dataclass(frozen=True)
    class Extended(Settings):
        greeting_count: int = setting(3, "how many greetings (test only)", minimum=1, maximum=9,
                                      hint="; nobody needs more")

    assert Extended.from_env({}).greeting_count == 3
    assert Extended.from_env({"SERVING_GREETING_COUNT": "7"}).greeting_count == 7
    with pytest.raises(ConfigError, match="SERVING_GREETING_COUNT='many' is not a whole number"):
        Extended.from_env({"SERVING_GREETING_COUNT": "many"})
    with pytest.raises(ConfigError, match="SERVING_GREETING_COUNT=12 must be <= 9; nobody needs more"):
        Extended.from_env({"SERVING_GREETING_COUNT": "12"})
    row = Extended.describe()[-1]
    assert (row.variable, row.default, row.accepts) == ("SERVING_GREETING_COUNT", "3", "integer, 1 to 9")
    page = docgen.settings_markdown(Extended)
    assert "| `SERVING_GREETING_COUNT` | `3` | integer, 1 to 9 | how many greetings (test only) |" in page
    assert "SERVING_GREETING_COUNT" not in docgen.settings_markdown()


def test_generated_docs_are_up_to_date() -> None:
    """docs/settings.md and the endpoint table in docs/api.md say what the code says (run `serving docs`)."""
    assert docgen.stale(ROOT, ENDPOINTS) == []


def test_the_full_matcher_routes_every_endpoint_and_knows_allowed_methods() -> None:
    router = Router(ENDPOINTS)
    for endpoint in ENDPOINTS:
        path = endpoint.path.replace("<name>", "digits-tf").replace("<version>", "3")
        found = router.match(endpoint.method, path)
        assert found is not None and found[0] is endpoint, endpoint.name
    assert router.match("HEAD", "/health") is not None and router.match("DELETE", "/health") is None
    assert router.allowed("/predict") == ["POST"] and router.allowed("/v2/repository/index") == ["GET", "POST"]
    assert router.allowed("/nope") == [] and router.match("GET", "/v2/models//ready") is None
