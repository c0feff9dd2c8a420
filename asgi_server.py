"""ASGI entry point: ``gunicorn asgi_server:app -k uvicorn_worker.UvicornWorker`` (or ``-k asgi``).

``SERVING_FRONT=asgi`` makes gunicorn.conf.py pick the worker (see docs/modes.md); settings are the
same SERVING_* variables as for flask_server:app. ``application`` is the same app, as in
flask_server.py.
"""

from serving.fronts.asgi import create_asgi_app

app = create_asgi_app()
application = app
