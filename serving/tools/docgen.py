"""The generated parts of the docs: the settings reference and the endpoint table.

gunicorn writes its settings page from its ``Setting`` classes (scripts/build_settings_doc.py); we
do the same from ``Settings`` and ``ENDPOINTS``, so the docs cannot drift from the code. ``serving
docs`` writes them; ``serving docs --check`` (run by the test suite) fails when a file is stale.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from serving.config import Settings
from serving.http.routing import Endpoint

BEGIN, END = "<!-- BEGIN GENERATED: endpoints -->", "<!-- END GENERATED: endpoints -->"
SETTINGS_PAGE = "docs/settings.md"
API_PAGE = "docs/api.md"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def settings_markdown(settings: type[Settings] = Settings) -> str:
    """docs/settings.md, whole, for ``settings`` (a subclass adds its own declarations)."""
    lines = [
        "# Settings",
        "",
        "<!-- Generated file: edit the declarations in serving/config.py, then run `serving docs`. "
        "-->",
        "",
        "Every setting is an environment variable, read once at start by `Settings.from_env()` "
        "(the only code that",
        "reads the environment). An empty value means the default. `serving config` prints the "
        "values in force;",
        "gunicorn's own command-line flags (`-w`, `-b`, `--threads`, `--timeout`, ...) override "
        "the matching ones.",
        "",
        "| variable | default | accepts | what it does |",
        "| --- | --- | --- | --- |",
    ]
    for row in settings.describe():
        default = (
            f"`{row.default}`"
            if row.default and not row.default.startswith("the ")
            else (row.default or "empty")
        )
        lines.append(
            f"| `{row.variable}` | {_cell(default)} | {_cell(row.accepts)} | {_cell(row.doc)} |"
        )
    return "\n".join(lines) + "\n"


def endpoints_markdown(endpoints: Iterable[Endpoint]) -> str:
    """The endpoint table: method, path, scope, summary, and whether the direct route serves it."""
    lines = ["| method | path | scope | what it does |", "| --- | --- | --- | --- |"]
    for endpoint in endpoints:
        direct = " (direct route)" if endpoint.direct else ""
        summary = _cell(endpoint.summary) + direct
        lines.append(f"| {endpoint.method} | `{endpoint.path}` | {endpoint.scope} | {summary} |")
    return "\n".join(lines)


def render(root: Path, endpoints: Iterable[Endpoint]) -> dict[Path, str]:
    """Every generated file under ``root`` as it should read now."""
    api = root / API_PAGE
    text = api.read_text()
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise ValueError(f"{api} has no {BEGIN} ... {END} block")
    block = f"{BEGIN}\n{endpoints_markdown(endpoints)}\n{END}"
    return {root / SETTINGS_PAGE: settings_markdown(), api: pattern.sub(lambda _: block, text)}


def stale(root: Path, endpoints: Iterable[Endpoint]) -> list[Path]:
    """The generated files that differ from what the code says."""
    return [
        path
        for path, text in render(root, endpoints).items()
        if not path.exists() or path.read_text() != text
    ]


def write(root: Path, endpoints: Iterable[Endpoint]) -> list[Path]:
    """Rewrite the stale generated files; returns them."""
    changed = []
    for path, text in render(root, endpoints).items():
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            changed.append(path)
    return changed
