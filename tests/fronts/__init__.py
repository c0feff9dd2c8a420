"""The fronts in process: the ASGI app's own behaviour, greenlet suspension."""
