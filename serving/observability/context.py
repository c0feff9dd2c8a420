"""The request a thread (or an event-loop task) is serving, in a neutral home every layer may read.

The fronts set it for each request (``serving.fronts.dispatch``, ``serving.fronts.asgi``); log
records take its id from here (``serving.observability.logging``), so observability never imports
the HTTP core. A
``contextvars`` variable, so pool threads and greenlets that run in a copy of the request's context
see it.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Protocol


class ServedRequest(Protocol):
    """What a log record reads of the current request."""

    request_id: str


#: The request being served here (None outside a request).
CURRENT_REQUEST: ContextVar[ServedRequest | None] = ContextVar("serving_request", default=None)
