"""What every answered request does last, on both fronts: count it in the metrics and write its
access line."""

from __future__ import annotations

import time

from serving.http.request import RequestState
from serving.observability import metrics
from serving.observability.logging import AccessLog

#: Methods counted under their own label; any other is counted as "other" (bounded label values).
METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"})


def finish(request: RequestState, endpoint: str, status: int, access_log: AccessLog) -> None:
    """Count the answered request in the metrics and write its access line (every dispatch path).

    The line names the model version the request used (``request.model``, set by the handler that
    looked it up), else ``-``: /metrics or a request for an unknown model used none."""
    method = request.method
    elapsed = time.perf_counter() - request.started
    metrics.observe_request(endpoint, method if method in METHODS else "other", status, elapsed)
    write_access(request, status, elapsed, access_log)


def write_access(request: RequestState, status: int, elapsed: float, access_log: AccessLog) -> None:
    """The request's access line (HTTP and gRPC alike): the model version it used, else ``-``."""
    access_log.write(
        request.request_id,
        request.method,
        request.path,
        status,
        elapsed * 1000.0,
        request.model or "-",
        request.batch_size,
    )
