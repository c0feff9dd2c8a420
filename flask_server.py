"""WSGI entry point: ``gunicorn flask_server:app`` (settings: SERVING_* variables, gunicorn.conf.py).

``application`` is the same app under the name the classic Flask-MNIST tutorial's daemon line uses
(``gunicorn flask_server:application --daemon``). ``python flask_server.py [--host H] [--port P]``
serves it as well, with gunicorn and this checkout's settings (``serving serve -b H:P``), instead of
Flask's development server.
"""

import argparse
import sys

from serving.fronts.wsgi import create_app

app = create_app()
application = app


def main(argv: list[str] | None = None) -> int:
    """``python flask_server.py``: serve this app with gunicorn and the packaged configuration."""
    from serving.cli import serve

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--host", default=None, help="address to bind (default: SERVING_BIND's)")
    parser.add_argument("--port", type=int, default=None, help="port to bind (default: SERVING_BIND's)")
    options, rest = parser.parse_known_args(argv)
    bind = []
    if options.host is not None or options.port is not None:
        host, _, port = app.serving_parts.settings.bind.rpartition(":")
        bind = ["-b", f"{options.host or host}:{options.port or port}"]
    return serve([*bind, *rest])


if __name__ == "__main__":
    sys.exit(main())
