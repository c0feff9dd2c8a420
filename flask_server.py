"""WSGI entry point: ``gunicorn flask_server:app`` (settings: SERVING_* variables, gunicorn.conf.py)."""

from serving.fronts.wsgi import create_app

app = create_app()
