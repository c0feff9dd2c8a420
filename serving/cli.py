"""The ``serving`` command (also ``python -m serving``): what users do, one subcommand each.

    serving serve [gunicorn flags] the server: gunicorn with the packaged config and the app factory
    serving train [options] train and publish models (the same as python train.py) serving config
    every setting with its current value serving bench --model NAME the bare in-process model call:
    the ceiling a server can reach serving docs [--check] regenerate (or check) docs/settings.md and
    the endpoint table serving digest [REPOSITORY] the SERVING_MODEL_SHA256 line that pins every
    version found serving import PATH --name NAME a Keras, SavedModel, TorchScript or ONNX
    classifier into the repository serving stop [--pid FILE] stop a daemon: SIGTERM once the pid
    file is checked to name its gunicorn master

Each subcommand imports only what it needs, so ``serving config`` never loads a framework.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

USAGE = (__doc__ or "").split("\n\n")[1]


def serve(argv: list[str]) -> int:
    """Replace this process with gunicorn, configured as ``gunicorn -c gunicorn.conf.py
    flask_server:app`` (``asgi_server:app`` with ``SERVING_FRONT=asgi``)."""
    from serving.config import Settings
    from serving.errors import ConfigError

    try:
        front = Settings.from_env().front
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    app = (
        "serving.fronts.asgi:create_asgi_app()"
        if front == "asgi"
        else "serving.fronts.wsgi:create_app()"
    )
    config = "python:serving.host.conf"
    os.execv(sys.executable, [sys.executable, "-m", "gunicorn", "-c", config, *argv, app])
    return 0  # pragma: no cover - execv does not return


def train(argv: list[str]) -> int:
    from serving.toolchain.train_cli import main

    return main(argv)


def config(argv: list[str]) -> int:
    from serving.config import main

    if argv not in ([], ["--markdown"]):
        print("usage: serving config [--markdown]", file=sys.stderr)
        return 2
    if argv:
        from serving.tools.docgen import settings_markdown

        print(settings_markdown(), end="")
        return 0
    return main()


def import_(argv: list[str]) -> int:
    from serving.toolchain.import_cli import main

    return main(argv)


def stop(argv: list[str]) -> int:
    from serving.host.stop import main

    return main(argv)


def bench(argv: list[str]) -> int:
    from serving.tools.modelbench import main

    return main(argv)


def docs(argv: list[str]) -> int:
    """Write the generated docs (``--check``: only report stale ones, exit 1) under ``--root``
    (default: .)."""
    import argparse

    from serving.protocol.endpoints import ENDPOINTS
    from serving.tools import docgen

    parser = argparse.ArgumentParser(prog="serving docs", description=docs.__doc__)
    parser.add_argument(
        "--check", action="store_true", help="exit 1 when a generated file is stale"
    )
    parser.add_argument("--root", type=Path, default=Path("."), help="the checkout holding docs/")
    args = parser.parse_args(argv)
    if args.check:
        stale = docgen.stale(args.root, ENDPOINTS)
        for path in stale:
            print(f"stale: {path} (run: serving docs)")
        return 1 if stale else 0
    for path in docgen.write(args.root, ENDPOINTS):
        print(f"wrote {path}")
    return 0


def digest(argv: list[str]) -> int:
    """Print ``SERVING_MODEL_SHA256=name:version=sha256(metadata.json),...`` for a repository's
    versions."""
    from serving.config import Settings
    from serving.store.repository import ModelRepository, sha256_file

    if len(argv) > 1 or argv[:1] in (["-h"], ["--help"]):
        print(
            "usage: serving digest [REPOSITORY]   (default: SERVING_MODEL_REPOSITORY, else models)"
        )
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    repository = ModelRepository(Path(argv[0]) if argv else Settings.from_env().model_repository)
    pins = [
        f"{name}:{version}={sha256_file(repository.root / name / str(version) / 'metadata.json')}"
        for name, version in repository.index()
    ]
    if not pins:
        print(f"error: no model version in {repository.root}/", file=sys.stderr)
        return 2
    print("SERVING_MODEL_SHA256=" + ",".join(pins))
    return 0


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "serve": serve,
    "train": train,
    "config": config,
    "bench": bench,
    "docs": docs,
    "digest": digest,
    "import": import_,
    "stop": stop,
}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(f"usage: serving COMMAND [options]\n\n{USAGE}")
        return 0 if args else 2
    command = COMMANDS.get(args[0])
    if command is None:
        print(
            f"serving: unknown command {args[0]!r}; one of: {', '.join(COMMANDS)}", file=sys.stderr
        )
        return 2
    return command(args[1:])
