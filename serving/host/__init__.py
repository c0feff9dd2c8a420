"""The gunicorn side: the config and its hooks, worker classes, the ASGI workers, `serving stop`."""
