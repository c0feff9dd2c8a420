"""Transports over the same endpoint table: the WSGI app (Flask + the direct dispatcher), the
ASGI app."""
