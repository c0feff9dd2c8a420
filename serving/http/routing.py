"""``Endpoint`` and ``Router``: every route declared once, as data, and everything generated from
it.

# design: an endpoint is one ``Endpoint`` in ``serving.protocol.endpoints.ENDPOINTS``: method, path
# (Flask's rule syntax), handler, summary, tag, auth scope, whether it may take the direct route,
# and its OpenAPI fragment. ``Router`` turns that table into Flask's URL rules, the direct-route
# matcher, the metric label of each request (the path pattern) and the OpenAPI paths, so none of
# them is written by hand. The direct matcher is compiled here rather than asking werkzeug:
# werkzeug's matcher costs ~6.5 us a match, a dict lookup plus a segment comparison ~0.4 us, and the
# direct routes exist because every microsecond on the inference POSTs shows in the benchmark.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from serving.http.answers import Answer

#: ``handler(request, service, **path_params) -> Answer``; it never imports a web framework.
Handler = Callable[..., Answer]
#: Who may call an endpoint: anyone (probes), inference clients, or operators.
Scope = Literal["public", "inference", "admin"]
METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH")
_VARIABLE = re.compile(r"^<([a-z_][a-z0-9_]*)>$")
_PATH = re.compile(
    r"^/([A-Za-z0-9._-]+|<[a-z_][a-z0-9_]*>)(/([A-Za-z0-9._-]+|<[a-z_][a-z0-9_]*>))*/?$|^/$"
)


# hashed by identity: a table of them keys the cached OpenAPI document
@dataclass(frozen=True, eq=False)
class Endpoint:
    """One route: ``path`` uses Flask's syntax (``/v2/models/<name>/infer``; variables match one
    segment)."""

    method: str
    path: str
    handler: Handler
    summary: str
    tag: str
    scope: Scope = "inference"
    #: May be answered by the direct dispatcher, skipping Flask (the hot inference POSTs).
    direct: bool = False
    #: The rest of the OpenAPI operation: ``responses``, ``requestBody``, extra ``parameters``, ...
    doc: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(
                f"{self.method} {self.path}: the method must be one of {', '.join(METHODS)}"
            )
        if not _PATH.match(self.path):
            raise ValueError(
                f"{self.method} {self.path}: a path is /segment/... with <variable> segments"
            )
        if self.scope not in ("public", "inference", "admin"):
            raise ValueError(f"{self.method} {self.path}: scope must be public, inference or admin")

    @property
    def name(self) -> str:
        """A unique name for Flask's endpoint registry."""
        return f"{self.method} {self.path}"

    @property
    def variables(self) -> tuple[str, ...]:
        """The path's variables, in order."""
        return tuple(
            match.group(1) for part in self.path.split("/") if (match := _VARIABLE.match(part))
        )

    @property
    def openapi_path(self) -> str:
        """The path in OpenAPI's syntax: ``/v2/models/{name}/infer``."""
        return re.sub(r"<([a-z_][a-z0-9_]*)>", r"{\1}", self.path)

    @property
    def metric_label(self) -> str:
        """The ``endpoint`` label of the request metrics: the path pattern, never the raw path."""
        return self.path


class _Table:
    """Endpoints compiled for matching: a dict for static paths, literal-segment checks for the
    rest."""

    def __init__(self, endpoints: Iterable[Endpoint]) -> None:
        self.static: dict[str, dict[str, Endpoint]] = {}
        self.patterns: dict[tuple[str, int], list[_Pattern]] = {}
        for endpoint in endpoints:
            if not endpoint.variables:
                self.static.setdefault(endpoint.path, {})[endpoint.method] = endpoint
                continue
            parts = endpoint.path.split("/")
            literals = tuple((i, part) for i, part in enumerate(parts) if not _VARIABLE.match(part))
            variables = tuple(
                (i, match.group(1))
                for i, part in enumerate(parts)
                if (match := _VARIABLE.match(part))
            )
            self.patterns.setdefault((endpoint.method, len(parts)), []).append(
                _Pattern(literals, variables, endpoint)
            )

    def match(
        self, method: str, path: str, ascii_only: bool
    ) -> tuple[Endpoint, dict[str, str]] | None:
        static = self.static.get(path)
        if static is not None:
            endpoint = static.get(method)
            return (endpoint, {}) if endpoint is not None else None
        parts = path.split("/")
        candidates = self.patterns.get((method, len(parts)))
        if not candidates or (ascii_only and not path.isascii()):
            return None
        for pattern in candidates:
            if all(parts[i] == literal for i, literal in pattern.literals):
                values = {name: parts[i] for i, name in pattern.variables}
                if all(values.values()):
                    return pattern.endpoint, values
        return None


@dataclass(frozen=True)
class _Pattern:
    """A compiled direct route with variables: the literal segments to compare and where the
    variables are."""

    literals: tuple[tuple[int, str], ...]
    variables: tuple[tuple[int, str], ...]
    endpoint: Endpoint


class Router:
    """The endpoint table, compiled: direct-route matching, Flask registration, labels, OpenAPI
    paths."""

    def __init__(self, endpoints: Iterable[Endpoint]) -> None:
        self.endpoints = tuple(endpoints)
        seen: set[tuple[str, str]] = set()
        for endpoint in self.endpoints:
            key = (endpoint.method, endpoint.path)
            if key in seen:
                raise ValueError(f"{endpoint.method} {endpoint.path} is declared twice")
            seen.add(key)
        self._by_name = {endpoint.name: endpoint for endpoint in self.endpoints}
        self._direct = _Table(endpoint for endpoint in self.endpoints if endpoint.direct)
        self._all = _Table(self.endpoints)

    def match_direct(self, method: str, path: str) -> tuple[Endpoint, dict[str, str]] | None:
        """The direct endpoint and path variables for a request, or None to let Flask dispatch it.

        A variable matches one non-empty ASCII segment, as Flask's default converter does for ASCII.
        """
        # Flask decodes a non-ASCII path (UTF-8 as latin-1)
        return self._direct.match(method, path, ascii_only=True)

    def match(self, method: str, path: str) -> tuple[Endpoint, dict[str, str]] | None:
        """Any endpoint (not only the direct ones) for a decoded path: the ASGI front routes with
        this.

        Literal segments are ASCII; a variable takes any non-empty segment, a model name like ``é``
        too. Leading slashes count as one, as werkzeug routes them (``//health`` is ``/health`` on
        both fronts).
        """
        return self._all.match(
            "GET" if method == "HEAD" else method, _one_leading_slash(path), ascii_only=False
        )

    def allowed(self, path: str) -> list[str]:
        """The methods some endpoint answers on ``path`` (for a 405's Allow header); empty for a
        404."""
        path = _one_leading_slash(path)
        return sorted(
            {
                method
                for method in METHODS
                if self._all.match(method, path, ascii_only=False) is not None
            }
        )

    def register(self, app: Any, view: Callable[[Endpoint], Callable[..., Any]]) -> None:
        """Add one Flask URL rule per endpoint; ``view(endpoint)`` makes its view function.

        Doubled slashes inside a path are not merged: werkzeug would answer ``/v2//models`` with an
        HTML 308; here, as on the ASGI front, it is a JSON 404.
        """
        app.url_map.merge_slashes = False
        for endpoint in self.endpoints:
            app.add_url_rule(
                endpoint.path,
                endpoint=endpoint.name,
                view_func=view(endpoint),
                methods=[endpoint.method],
            )

    def by_name(self, name: str) -> Endpoint | None:
        """The endpoint Flask matched, by the name ``register`` gave its rule."""
        return self._by_name.get(name)


def _one_leading_slash(path: str) -> str:
    return "/" + path.lstrip("/") if path.startswith("//") else path
