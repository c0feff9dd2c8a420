"""The OpenAPI document: valid, complete, rendered offline at /docs, and true of a real server under fuzzing."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from html import escape
from pathlib import Path

import pytest
import requests
from flask import Flask
from openapi_spec_validator import validate

from serving.config import Settings
from serving.fronts.wsgi import create_app
from serving.protocol.endpoints import ENDPOINTS
from serving.protocol.openapi import document as build_document
from tests.conftest import GunicornServer, clean_env

SCHEMATHESIS = str(Path(sys.executable).with_name("st"))
# Coverage phase left out: under this CPython 3.11.7, Hypothesis' lambda reprs inside schemathesis' coverage
# phase hit "SystemError: AST constructor recursion depth mismatch" (a CPython bug) at random; the examples,
# fuzzing and stateful phases generate the same kinds of valid and invalid requests.
PHASES = "examples,fuzzing,stateful"
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,"
          "response_schema_conformance")


def document() -> dict:
    return build_document(ENDPOINTS)


@pytest.fixture(scope="module")
def app(model_repo: Path) -> Flask:
    return create_app(Settings.from_env({}, model_repository=model_repo, backend="onnx", access_log=False))


def test_document_is_valid_openapi() -> None:
    validate(document())  # raises on any violation of the OpenAPI 3.0 schema


def test_every_route_is_documented(app: Flask) -> None:
    documented = {(path, method) for path, methods in document()["paths"].items() for method in methods}
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        for method in rule.methods - {"HEAD", "OPTIONS"}:  # type: ignore[operator]
            assert (path, method.lower()) in documented, f"{method} {path} is not in /openapi.json"
    for path, methods in document()["paths"].items():
        for method, operation in methods.items():
            assert operation["responses"]["200"]["content"], (method, path)
            assert operation["summary"], (method, path)


def test_docs_render_offline(app: Flask) -> None:
    client = app.test_client()
    served = client.get("/openapi.json")
    assert served.status_code == 200 and served.json == document()
    page = client.get("/docs")
    assert page.status_code == 200 and page.content_type.startswith("text/html")
    html = page.get_data(as_text=True)
    for path in document()["paths"]:
        assert f"<code>{escape(path)}</code>" in html, path
    assert "<script" not in html and "<link" not in html and "src=" not in html
    assert not re.search(r"""(href|src)=['"]?(https?:)?//""", html), "no external URL may be loaded"


@pytest.fixture(scope="module")
def server(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GunicornServer]:
    srv = GunicornServer(model_repo, tmp_path_factory.mktemp("logs"), backend="onnx", models="*",
                         max_body_bytes=65536, max_batch=16, access_log="false")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.mark.slow
def test_schemathesis_finds_no_5xx_and_no_schema_mismatch(server: GunicornServer, tmp_path: Path) -> None:
    assert requests.get(server.url + "/openapi.json", timeout=5).json() == document()
    # 504 is the documented answer to a request whose own deadline (X-Request-Timeout-Ms, from 1 ms) passed before
    # its model call ended: the fuzzer sends 1 ms, and whether a call fits in it depends on the machine's load
    (tmp_path / "schemathesis.toml").write_text(
        '[checks.not_a_server_error]\nexpected-statuses = ["2xx", "3xx", "4xx", "504"]\n'
    )
    result = subprocess.run(
        [SCHEMATHESIS, "run", server.url + "/openapi.json", "--checks", CHECKS, "--phases", PHASES,
         "--max-examples", "25", "--workers", "2", "--seed", "7", "--generation-database", "none",
         "--request-timeout", "10", "--no-color"],
        cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=300, check=False,
    )
    summary = result.stdout[-3000:]
    assert result.returncode == 0, summary + result.stderr[-2000:]
    assert re.search(r"\d+ generated, \d+ passed", summary), summary
    log = server.log()
    assert "Traceback" not in log and "unhandled error" not in log, log[-3000:]
