"""The docs cannot rot: their shell blocks run, their links resolve, the names they cite exist.

LitServe runs its README's code blocks (tests/unit/test_readme.py); this does the same for ours.
The convention (docs/contributing.md#documentation):

- A fenced block whose info string is ``sh`` is a command this test runs, with bash (``-e -o
  pipefail``), from the repository root, with the venv's ``bin`` first on PATH and
  ``SERVING_MODEL_REPOSITORY`` pointing at the session's trained repository. It must exit 0, so a
  curl that expects success uses ``-f``.
- An ``sh`` block that talks to ``localhost:8000`` or ``127.0.0.1:8000`` (or to its gRPC port, ``8001``) runs
  against one real gunicorn started here on free ports (the ports are rewritten in the command), serving what a user
  has after ``python train.py`` (the default ``mnist-torch``), ``--dataset digits`` (``digits-tf``,
  ``digits-torch``) and ``--dataset iris`` (``iris-svc``), with ``SERVING_MODELS=*`` so v2 serves
  them all. A page that needs another default names its settings in a comment,
  ``<!-- docs-server: model=iris-svc -->``, and its blocks get a server of their own.
- A ``json`` block right after ``<!-- response: METHOD PATH [JSON body] -->`` is a documented answer:
  the same request to that server must answer the same shape (the same keys, recursively, and the same
  kind of value under each), so an example cannot drift from what the server says.
- A block that cannot run here (a server in the foreground, docker, wrk, a full training run) uses
  ``text`` or ``console``. Every fence says what it is: ``bash``, ``shell`` and bare fences are refused.
- No command may leave files in the repository.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
VENV_BIN = Path(sys.executable).parent
README_MAX_LINES = 200
COMMAND_TIMEOUT = 120.0
SERVER = re.compile(r"\b(localhost|127\.0\.0\.1):800([01])\b")  # 8000 HTTP, 8001 gRPC
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
RUN = "sh"  # run by this test; `text` and `console` blocks are shown, not run
REFUSED_INFO = {"", "bash", "shell", "zsh", "shell-session"}
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
#: Backticked repository paths that must exist (placeholders such as <name> or * are skipped).
REPO_PATH = re.compile(r"^(?:serving|tests|bench|deploy|reports|docs)/[^\s<>*{}\[\]|$]*$"
                       r"|^(?:train|flask_server|locustfile|gunicorn\.conf)\.py$|^(?:Makefile|pyproject\.toml)$")
TEST_NAME = re.compile(r"^test_\w+$")
#: Where a command could leave a file behind (a pid, a log, a model, a report), besides the top level;
#: compared before and after each run.
WATCHED = ("run", "models", "reports")
PAGE_SERVER = re.compile(r"<!--\s*docs-server:\s*(.*?)\s*-->")
RESPONSE = re.compile(r"^\s*<!--\s*response:\s*(GET|POST)\s+(\S+)\s*(.*?)\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced code block of a markdown file."""

    path: Path
    line: int  # 1-based line of the opening fence
    end: int  # 1-based line of the closing fence
    info: str
    code: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """Every fenced block in ``path``; an indented fence (inside a list item) is dedented."""
    found: list[Block] = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        body: list[str] = []
        j = i + 1
        while j < len(lines):
            stripped = lines[j].strip()
            if stripped.startswith(fence[0] * len(fence)) and not stripped.strip(fence[0]):
                break
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        found.append(Block(path, i + 1, j + 1, opening["info"].strip().split(" ")[0], "\n".join(body) + "\n"))
        i = j + 1
    return found


def without_blocks(path: Path) -> str:
    """The markdown of ``path`` with its fenced blocks blanked out, line numbers kept."""
    fenced = {number for block in blocks(path) for number in range(block.line, block.end + 1)}
    return "\n".join("" if number in fenced else line
                     for number, line in enumerate(path.read_text().splitlines(), 1))


def prose(path: Path) -> str:
    """The markdown of ``path`` without its code blocks and inline code, line numbers kept."""
    return re.sub(r"`+[^`\n]*`+", "", without_blocks(path))


def page_settings(path: Path) -> tuple[tuple[str, str], ...]:
    """The server settings a page names (``<!-- docs-server: model=iris-svc -->``), sorted."""
    found = PAGE_SERVER.search(path.read_text())
    pairs = [item.split("=", 1) for item in found[1].split()] if found else []
    return tuple(sorted((key, value) for key, value in pairs))


@dataclass(frozen=True)
class Response:
    """A documented answer: the request, and the JSON block that shows what it answers."""

    block: Block
    method: str
    path: str
    body: str


def responses(path: Path) -> list[Response]:
    lines = path.read_text().splitlines()
    found = []
    for block in blocks(path):
        match = RESPONSE.match(lines[block.line - 2]) if block.line >= 2 else None
        if match is not None and block.info == "json":
            found.append(Response(block, match[1], match[2], match[3]))
    return found


ALL_BLOCKS = [block for path in DOCS for block in blocks(path)]
RESPONSES = [response for path in DOCS for response in responses(path)]
SH_BLOCKS = [block for block in ALL_BLOCKS if block.info == RUN]
SERVER_BLOCKS = [block for block in SH_BLOCKS if SERVER.search(block.code)]
OFFLINE_BLOCKS = [block for block in SH_BLOCKS if not SERVER.search(block.code)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> list[str]:
    """Every heading anchor of a markdown file, with GitHub's -1, -2 suffixes for repeated ones."""
    seen: dict[str, int] = {}
    result: list[str] = []
    for line in prose(path).splitlines():
        match = HEADING.match(line)
        if match is None:
            continue
        base = slug(match[2])
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.append(base if count == 0 else f"{base}-{count}")
    result += re.findall(r"<a\s+(?:name|id)=\"([^\"]+)\"", path.read_text())
    return result


@pytest.fixture(scope="module")
def docs_repo(model_repo: Path, mnist_repo: Path, iris_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What a user has after python train.py, --dataset digits and --dataset iris: one repository."""
    import shutil

    root = tmp_path_factory.mktemp("docs") / "models"
    for source in (mnist_repo, model_repo, iris_repo):
        shutil.copytree(source, root, dirs_exist_ok=True)
    return root


def command_env(model_repo: Path) -> dict[str, str]:
    """What a user's shell would have after ``make serve``: the venv first on PATH, no SERVING_* set."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("SERVING_")}
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(VENV_BIN.parent),
        TF_CPP_MIN_LOG_LEVEL="2", SERVING_MODEL_REPOSITORY=str(model_repo),
    )
    return env


def run_block(block: Block, env: dict[str, str], port: int | None = None, grpc_port: int | None = None) -> str | None:
    """Run one ``sh`` block; None when it exits 0, else what went wrong."""
    ports = {"0": port, "1": grpc_port}
    code = block.code if port is None else SERVER.sub(lambda m: f"{m[1]}:{ports[m[2]]}", block.code)
    proc = subprocess.Popen(
        ["bash", "-e", "-o", "pipefail", "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=COMMAND_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return f"{block.id}: still running after {COMMAND_TIMEOUT:.0f}s\n{code}\n{out[-2000:]}{err[-2000:]}"
    finally:
        try:  # anything the block left running in the background
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc.returncode == 0:
        return None
    return f"{block.id}: exit {proc.returncode}\n{code}\n--- stdout\n{out[-2000:]}\n--- stderr\n{err[-3000:]}"


def repository_files() -> set[str]:
    """Files at the top of the repository and under the folders a command could write into."""
    files = {entry.name for entry in ROOT.iterdir()}
    for folder in WATCHED:
        files.update(str(path.relative_to(ROOT)) for path in (ROOT / folder).rglob("*"))
    return files


@pytest.fixture
def leaves_no_files() -> Iterator[None]:
    """Fail when the commands of a test left new files in the repository."""
    before = repository_files()
    yield
    left = sorted(repository_files() - before)
    assert not left, f"the docs' commands left files in the repository: {left}"


def test_every_code_block_says_what_it_is() -> None:
    unlabelled = [f"{block.id} ({block.info or 'no info string'})" for block in ALL_BLOCKS
                  if block.info in REFUSED_INFO]
    assert not unlabelled, (
        "label every fence: `sh` for a command the tests run, `text` or `console` for one they cannot"
        f" run here: {unlabelled}"
    )


@pytest.mark.parametrize("block", OFFLINE_BLOCKS, ids=[block.id for block in OFFLINE_BLOCKS])
def test_shell_block_runs(block: Block, docs_repo: Path, leaves_no_files: None) -> None:
    failure = run_block(block, command_env(docs_repo))
    assert failure is None, failure


def test_shell_blocks_against_a_server_run(
    server_factory: Callable[..., Any], docs_repo: Path, leaves_no_files: None
) -> None:
    """Every block that talks to localhost:8000 (or its gRPC port, 8001) and every documented answer, against
    real gunicorn (one per set of page settings); all failures reported at once."""
    assert SERVER_BLOCKS, "no sh block talks to a server: the first request in the README should"
    assert RESPONSES, "no documented answer is checked: mark the examples with <!-- response: ... -->"
    env = command_env(docs_repo)
    failures: list[str] = []
    for settings in sorted({page_settings(block.path) for block in SERVER_BLOCKS}):
        with server_factory(docs_repo, models="*", workers=1, **dict(settings)) as server:
            failures += [failure for block in SERVER_BLOCKS if page_settings(block.path) == settings
                         and (failure := run_block(block, env, server.port, server.grpc_port))]
            failures += [failure for response in RESPONSES if page_settings(response.block.path) == settings
                         and (failure := check_response(response, server.url))]
    assert not failures, "\n\n".join(failures)


def shape(value: Any) -> Any:
    """The shape of a JSON value: keys (recursively) and the kind of each value; a list's first item."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    if isinstance(value, bool) or value is None:
        return type(value).__name__
    return "number" if isinstance(value, int | float) else type(value).__name__


def check_response(response: Response, url: str) -> str | None:
    """None when the server's answer has the documented shape, else what differs."""
    import orjson
    import requests

    documented = orjson.loads(response.block.code)
    body = orjson.loads(response.body) if response.body else None
    answer = requests.request(response.method, url + response.path, json=body, timeout=30)
    if answer.status_code >= 500 or not answer.headers.get("Content-Type", "").startswith("application/json"):
        return f"{response.block.id}: {response.method} {response.path} answered {answer.status_code}"
    if shape(answer.json()) != shape(documented):
        return (f"{response.block.id}: {response.method} {response.path} answers a different shape than documented:"
                f"\n  documented {shape(documented)}\n  answered   {shape(answer.json())}")
    return None


def test_readme_is_a_front_door() -> None:
    readme = ROOT / "README.md"
    lines = readme.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"
    text = prose(readme)
    sections = [slug(m[2]) for line in text.splitlines() if (m := HEADING.match(line)) and m[1] == "##"]
    contents = text.split("## Contents", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"\]\(#([^)]+)\)", contents)
    assert listed == [s for s in sections if s != "contents"], "the README's contents list and its ## sections differ"


def test_relative_links_resolve() -> None:
    broken: list[str] = []
    for path in DOCS:
        for number, line in enumerate(prose(path).splitlines(), 1):
            for target in LINK.findall(line):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                    continue
                file_part, _, anchor = target.partition("#")
                resolved = (path.parent / file_part).resolve() if file_part else path
                where = f"{path.relative_to(ROOT)}:{number}: {target}"
                if not resolved.exists():
                    broken.append(f"{where} (no such file)")
                elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                    broken.append(f"{where} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_cited_tests_and_paths_exist() -> None:
    """A test or a file the docs name (in backticks) exists, so a promise cannot outlive its proof."""
    defined = {name for path in (ROOT / "tests").rglob("*.py")
               for name in re.findall(r"^\s*(?:async\s+)?def\s+(test_\w+)", path.read_text(), re.MULTILINE)}
    missing: list[str] = []
    for path in DOCS:
        for cited in re.findall(r"`([^`\n]+)`", without_blocks(path)):
            cited = cited.strip()
            if TEST_NAME.match(cited) and cited not in defined:
                missing.append(f"{path.relative_to(ROOT)}: test {cited}")
            elif REPO_PATH.match(cited) and not (ROOT / cited).exists():
                missing.append(f"{path.relative_to(ROOT)}: path {cited}")
    assert not missing, "named in the docs but not in the repository:\n" + "\n".join(sorted(set(missing)))


def test_generated_endpoint_table_has_its_markers() -> None:
    """``serving docs`` fills the endpoint table between these markers; each must be there once."""
    api = (ROOT / "docs" / "api.md").read_text()
    for marker in ("<!-- BEGIN GENERATED: endpoints -->", "<!-- END GENERATED: endpoints -->"):
        assert api.count(marker) == 1, f"docs/api.md needs exactly one {marker}"
