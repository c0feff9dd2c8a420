"""Shared fixtures: a model repository trained once per session, and real gunicorn servers.

Servers are real ``gunicorn -c gunicorn.conf.py flask_server:app`` processes on a free loopback
port, from the harness tests and benchmarks share (``serving.tools.testing``); ``GunicornServer.stop``
always runs (context manager / fixture finalizer), so a failing test leaves no process behind.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from serving.tools.testing import GunicornServer as _Harness
from serving.tools.testing import clean_env, free_port, gunicorn_command

__all__ = ["GUNICORN", "PYTHON", "ROOT", "GunicornServer", "clean_env", "free_port", "train"]

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
GUNICORN = gunicorn_command()[0]


def train(out: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run the real ``train.py`` CLI into ``out``."""
    return subprocess.run(
        [PYTHON, "train.py", "--out", str(out), *args], cwd=ROOT, env=clean_env(), capture_output=True,
        text=True, timeout=timeout, check=False,
    )


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with digits-tf/1 and digits-torch/1 (the 8x8 digits: seconds to train), trained
    once for the whole session."""
    out = tmp_path_factory.mktemp("models")
    result = train(out, "--dataset", "digits")
    assert result.returncode == 0, result.stdout + result.stderr
    return out


@pytest.fixture(scope="session")
def mnist_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model, as a user gets it: ``python train.py`` with no option (mnist-torch/1 on all of real
    MNIST, evaluated on all 10,000 t10k images), MNIST found through MNIST_DIR, nothing downloaded (skips where
    MNIST_DIR has no MNIST). About a minute on a shared 2-core machine."""
    from tests.mnist_support import NO_MIRROR, mnist_dir

    out = tmp_path_factory.mktemp("mnist-models")
    result = subprocess.run(
        [PYTHON, "train.py", "--out", str(out)], cwd=ROOT,
        env=clean_env(MNIST_DIR=str(mnist_dir()), MNIST_MIRRORS=NO_MIRROR,
                      XDG_CACHE_HOME=str(tmp_path_factory.mktemp("xdg"))),
        capture_output=True, text=True, timeout=900, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["mnist-torch"], result.stdout
    return out


@pytest.fixture(scope="session")
def iris_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """iris-svc/1: ``python train.py --dataset iris``, the web-single-pattern tutorial's scikit-learn SVM exported
    with skl2onnx (a feature-vector model; about two seconds)."""
    out = tmp_path_factory.mktemp("iris-models")
    result = train(out, "--dataset", "iris")
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def iris_svm() -> Any:
    """The scikit-learn model ``train.py --dataset iris`` fits, fitted again here (same split, same seed): what
    the served probabilities must match."""
    import warnings

    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    from serving.toolchain.data import load_iris_dataset

    data = load_iris_dataset(seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # SVC(probability=True): deprecated in scikit-learn 1.9
        return Pipeline([("scale", StandardScaler()), ("svc", SVC(probability=True, random_state=0))]).fit(
            data.x_train, data.y_train)


class GunicornServer(_Harness):
    """The harness's ``GunicornServer`` running this checkout's ``gunicorn.conf.py`` and ``flask_server:app``."""

    def __init__(self, repo: Path, log_dir: Path, args: tuple[str, ...] = (), **settings: Any) -> None:
        super().__init__(repo, log_dir, args, cwd=ROOT, **settings)


@pytest.fixture
def server_factory(model_repo: Path, tmp_path: Path) -> Iterator[Any]:
    """Build servers in a test; every one of them is stopped when the test ends."""
    started: list[GunicornServer] = []

    def make(repo: Path | None = None, args: tuple[str, ...] = (), **settings: Any) -> GunicornServer:
        server = GunicornServer(repo or model_repo, tmp_path, args, **settings)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def repo_copy(model_repo: Path, tmp_path: Path) -> Path:
    """A private copy of the trained repository that a test may modify."""
    target = tmp_path / "models"
    shutil.copytree(model_repo, target)
    return target
