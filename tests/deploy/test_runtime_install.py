"""What a deployment installs is enough to serve: the images' and the systemd host's install, for real.

The images and the systemd install take the package's own dependencies and extras from pyproject.toml, pinned
by requirements-runtime.txt (and requirements-frameworks.txt in the full image) as pip constraints. These tests
build that install in a fresh virtualenv (no test, bench or training tool, no framework) and serve from it on
both fronts in every mode; and they check that the constraints files are what ``make lock`` writes, and that
every third-party module the server imports is a declared dependency of the package.
"""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import requests
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from serving.tools.testing import GunicornServer
from tests.conftest import PYTHON, ROOT

#: Layers that build models or drive tests and benchmarks: never imported by a running server.
TOOLCHAIN = {"toolchain", "tools"}


def pins(name: str) -> dict[str, str]:
    lines = (ROOT / name).read_text().splitlines()
    found = dict(line.split("==") for line in lines if line and not line.startswith("#"))
    return {canonicalize_name(key.split("[")[0]): value for key, value in found.items()}


def test_the_constraints_files_are_what_make_lock_writes() -> None:
    result = subprocess.run([PYTHON, "scripts/lock_requirements.py", "--check"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_constraints_pin_what_requirements_txt_pins() -> None:
    main = pins("requirements.txt")
    for name in ("requirements-runtime.txt", "requirements-frameworks.txt"):
        for package, version in pins(name).items():
            assert main.get(package, version) == version, f"{name}: {package}=={version}, not {main[package]}"
    runtime = set(pins("requirements-runtime.txt"))
    assert not runtime & {"pytest", "locust", "ruff", "torch", "tensorflow-cpu", "onnx", "tf2onnx", "scikit-learn"}


def server_imports() -> dict[str, set[str]]:
    """{top-level third-party module: the server modules importing it}, function-local imports included."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / "serving").rglob("*.py")):
        if path.relative_to(ROOT / "serving").parts[0] in TOOLCHAIN:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top != "serving" and top not in sys.stdlib_module_names:
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_module_the_server_imports_is_a_pinned_dependency() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {canonicalize_name(Requirement(text).name) for text in project["dependencies"]}
    for extra in ("onnx", "tensorflow", "pytorch"):
        declared |= {canonicalize_name(Requirement(text).name) for text in project["optional-dependencies"][extra]}
    pinned = set(pins("requirements-runtime.txt")) | set(pins("requirements-frameworks.txt"))
    distributions = metadata.packages_distributions()
    imports = server_imports()
    assert {"flask", "gunicorn", "numpy", "greenlet", "uvicorn", "onnxruntime", "torch"} <= set(imports)
    for module, where in sorted(imports.items()):
        names = {canonicalize_name(name) for name in distributions.get(module, [module])}
        assert names & declared, f"{module} (imported by {sorted(where)}) is not a dependency in pyproject.toml"
        assert names & pinned, f"{module} (imported by {sorted(where)}) is not pinned: run make lock"


@pytest.fixture(scope="module")
def runtime_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv holding exactly what the ONNX image installs (pyproject's dependencies and the onnx
    extra, pinned by requirements-runtime.txt), the package installed from the checkout as the image does."""
    venv = tmp_path_factory.mktemp("runtime") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    result = subprocess.run([*pip, "install", "-c", str(ROOT / "requirements-runtime.txt"), f"{ROOT}[onnx]"],
                            capture_output=True, text=True, timeout=600, check=False, cwd=venv.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    check = subprocess.run([*pip, "check"], capture_output=True, text=True, timeout=120, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    return venv


@pytest.mark.slow
def test_the_runtime_install_holds_no_framework_or_tool(runtime_venv: Path) -> None:
    freeze = subprocess.run([str(runtime_venv / "bin" / "python"), "-m", "pip", "freeze", "--exclude-editable"],
                            capture_output=True, text=True, timeout=120, check=True).stdout
    installed = {canonicalize_name(line.split("==")[0]): line.split("==")[1] for line in freeze.splitlines()
                 if "==" in line}
    assert "serving @ file:" in freeze or "serving" in installed
    installed.pop("serving", None)
    assert installed == pins("requirements-runtime.txt"), "the install differs from the constraints: make lock"


@pytest.mark.slow
@pytest.mark.parametrize("front", ["wsgi", "asgi"])
@pytest.mark.parametrize("mode", ["process", "threaded", "batched"])
def test_the_runtime_install_serves_on_both_fronts_in_every_mode(runtime_venv: Path, model_repo: Path,
                                                                 tmp_path: Path, front: str, mode: str) -> None:
    """``serving serve`` from the runtime install (the images' command) answers /predict and v2 right."""
    server = GunicornServer(model_repo, tmp_path, cwd=tmp_path, model="digits-torch", backend="onnx", front=front,
                            mode=mode, workers="1")
    server.command = [str(runtime_venv / "bin" / "serving"), "serve"]
    sample = json.loads((model_repo / "digits-torch" / "1" / "sample.json").read_text())
    with server:
        answer = requests.post(f"{server.url}/predict/label", json={"data": [sample["data"]]}, timeout=10)
        assert answer.status_code == 200, answer.text
        assert answer.json()["prediction"] == [sample["label"]]
        assert requests.get(f"{server.url}/v2/models/digits-torch", timeout=10).json()["platform"] == "onnxruntime_onnx"
