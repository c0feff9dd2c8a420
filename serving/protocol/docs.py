"""API documentation handlers: ``GET /openapi.json`` (the OpenAPI 3 document) and ``GET /docs`` (it,
as HTML).

``/docs`` is rendered on the server from the same document, with no script and no external asset, so
it works on a machine without network access.
"""

from __future__ import annotations

from functools import lru_cache
from html import escape
from typing import Any

import orjson

from serving.http.answers import Answer, json_answer
from serving.http.request import RequestState
from serving.http.routing import Endpoint
from serving.protocol.openapi import document
from serving.runtime.service import InferenceService

STYLE = (
    "body{font:15px/1.45 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;"
    "color:#222}"
    "h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}"
    ".op{border:1px solid #ddd;border-radius:6px;margin:1em 0;padding:.6em 1em}"
    ".m{display:inline-block;min-width:4.5em;font-weight:700;text-transform:uppercase}"
    ".get{color:#0a6}.post{color:#06c}"
    "code,pre{background:#f5f5f5;border-radius:4px;padding:.1em .3em}"
    "pre{padding:.8em;overflow:auto}table{border-collapse:collapse}"
    "td,th{padding:.2em .8em;text-align:left}"
    "nav a{margin-right:1em}"
)


def _endpoints(request: RequestState) -> tuple[Endpoint, ...]:
    if not request.endpoints:
        raise RuntimeError(
            "the API documents are built from the endpoint table serving the request"
        )
    return tuple(request.endpoints)


def openapi(request: RequestState, service: InferenceService) -> Answer:
    """``GET /openapi.json``: the document for every endpoint this app routes."""
    return json_answer(document(_endpoints(request)))


def html_docs(request: RequestState, service: InferenceService) -> Answer:
    """``GET /docs``: the same document as one HTML page."""
    return Answer(200, render(_endpoints(request)).encode(), "text/html; charset=utf-8")


@lru_cache(maxsize=8)
def render(endpoints: tuple[Endpoint, ...]) -> str:
    """The whole document as one HTML page: operations by tag, then the schemas."""
    doc = document(endpoints)
    tags: dict[str, list[tuple[str, str, dict[str, Any]]]] = {}
    for path, methods in doc["paths"].items():
        for method, operation in methods.items():
            tags.setdefault(operation["tags"][0], []).append((method, path, operation))
    info = doc["info"]
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(info['title'])} "
        "API</title>",
        f"<style>{STYLE}</style></head><body><h1>{escape(info['title'])} "
        f"{escape(info['version'])}</h1>",
        f"<p>{escape(info['description'])}</p><p>Machine-readable: <a "
        "href='/openapi.json'>/openapi.json</a>"
        f" (OpenAPI {escape(doc['openapi'])}).</p><nav>",
        *(f"<a href='#{_anchor(tag)}'>{escape(tag)}</a>" for tag in tags),
        "<a href='#schemas'>schemas</a></nav>",
    ]
    for tag, operations in tags.items():
        parts.append(f"<h2 id='{_anchor(tag)}'>{escape(tag)}</h2>")
        parts.extend(
            _operation(method, path, operation, doc) for method, path, operation in operations
        )
    parts.append("<h2 id='schemas'>schemas</h2>")
    for name, schema in doc["components"]["schemas"].items():
        text = orjson.dumps(schema, option=orjson.OPT_INDENT_2).decode()
        parts.append(f"<h3 id='schema-{escape(name)}'>{escape(name)}</h3><pre>{escape(text)}</pre>")
    parts.append("</body></html>")
    return "".join(parts)


def _anchor(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower())


def _operation(method: str, path: str, operation: dict[str, Any], doc: dict[str, Any]) -> str:
    rows = [
        f"<div class='op'><span class='m {method}'>{method}</span> <code>{escape(path)}</code>"
        f" &mdash; {escape(operation['summary'])}"
    ]
    if operation.get("description"):
        rows.append(f"<p>{escape(operation['description'])}</p>")
    if operation.get("parameters"):
        rows.append(
            "<p>Parameters: "
            + ", ".join(
                f"<code>{escape(p['name'])}</code> "
                f"({escape(p['in'])}{', required' if p.get('required') else ''})"
                for p in operation["parameters"]
            )
            + "</p>"
        )
    if "requestBody" in operation:
        bodies = ", ".join(
            f"<code>{escape(media)}</code> {_schema_link(entry['schema'])}"
            for media, entry in operation["requestBody"]["content"].items()
        )
        rows.append(f"<p>Body: {bodies}</p>")
    rows.append("<table><tr><th>status</th><th>meaning</th><th>body</th></tr>")
    for status, response in operation["responses"].items():
        if "$ref" in response:
            response = doc["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
        bodies = ", ".join(
            f"<code>{escape(media)}</code> {_schema_link(entry['schema'])}"
            for media, entry in response.get("content", {}).items()
        )
        rows.append(
            f"<tr><td>{escape(status)}</td><td>{escape(response['description'])}</td><td>{bodies}</td></tr>"
        )
    rows.append("</table></div>")
    return "".join(rows)


def _schema_link(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[1]
        return f"<a href='#schema-{escape(name)}'>{escape(name)}</a>"
    return f"<code>{escape(orjson.dumps(schema).decode())}</code>"
