"""The layers of ``serving/`` are a contract a checker enforces, not a picture in the docs.

``[tool.importlinter]`` in pyproject.toml declares them (docs/contributing.md draws the tree): each layer
imports only from the layers below it, the server never imports the toolchain or the developer tools, and
the two fronts are independent. These tests run the real checker on the package, and on a copy of it with
one forbidden import added, which it must refuse; and they look for import cycles inside ``serving/``
themselves (function-local imports included), since a cycle inside one layer is no layering violation.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

LINT_IMPORTS = str(Path(sys.executable).with_name("lint-imports"))


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([LINT_IMPORTS, "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root,
                          env=env, capture_output=True, text=True, timeout=120, check=False)


def test_the_layering_contract_holds() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(("module", "forbidden", "contract"), [
    ("serving/runtime/service.py", "from serving.fronts import suspend", "layers"),
    ("serving/http/answers.py", "import serving.runtime.service", "layers"),
    ("serving/protocol/native.py", "from serving.toolchain import training", "the server never imports"),
    ("serving/fronts/asgi.py", "from serving.fronts.wsgi import create_app", "independent transports"),
])
def test_a_forbidden_import_breaks_the_contract(tmp_path: Path, module: str, forbidden: str, contract: str) -> None:
    shutil.copytree(ROOT / "serving", tmp_path / "serving", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    path = tmp_path / module
    path.write_text(path.read_text() + f"\n{forbidden}  # noqa\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0, result.stdout
    broken = result.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken and module.removesuffix(".py").replace("/", ".") in broken, result.stdout


def imports_of(path: Path, package: str) -> set[str]:
    """The ``serving`` modules a module imports, wherever in it the import statement stands."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith(package):
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith(package))
    return found


def test_no_import_cycle_inside_serving() -> None:
    modules = {".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): path
               for path in (ROOT / "serving").rglob("*.py")}
    graph = {name: {target for target in imports_of(path, "serving") if target in modules and target != name}
             for name, path in modules.items()}
    for name, targets in graph.items():  # importing a package runs its __init__, not its submodules
        graph[name] = {target for target in targets if not name.startswith(target + ".")}
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target):] + [target] if target in stack else [node, target])
            elif target not in state:
                visit(target, [*stack, target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_serving_is_formatted_and_held_to_100_character_lines() -> None:
    """serving/ruff.toml: 100 characters, ruff format's layout; ruff check (E, F, I, UP, B) clean everywhere."""
    ruff = str(Path(sys.executable).with_name("ruff"))
    checks = [[ruff, "format", "--check", "--no-cache", "serving"],
              [ruff, "check", "--no-cache", "serving", "tests", "bench", "deploy", "scripts"]]
    for command in checks:
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
    # protoc's output is generated, not written (scripts/generate_protos.py --check keeps it current)
    assert max(len(line) for path in (ROOT / "serving").rglob("*.py") if not path.name.endswith("_pb2.py")
               for line in path.read_text().splitlines() if " " in line.strip()) <= 100
