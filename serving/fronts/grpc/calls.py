"""One gRPC call, from its metadata to its status: the gRPC front's equivalent of the dispatcher.

# design: every call of an ``Rpc`` (``serving.protocol.v2.rpcs.RPCS``) runs ``GrpcCalls.call`` on
# one of the server's handler threads. It builds the call's ``GrpcRequest`` (``RequestState`` over
# the call's metadata: the request id from ``x-request-id``, the key from ``authorization``, the
# deadline from the call's own), makes it the thread's current request, counts it in flight
# (batched mode: the batcher waits only while others are), parses the message (a message that does
# not parse is INVALID_ARGUMENT, never gRPC's own INTERNAL with a traceback in the log), checks the
# scope with the same ``Gate`` as HTTP, and calls the handler. A failure goes through
# ``answer_for_exception``, the one place a failure is counted and logged, and its HTTP status
# becomes the gRPC code (``STATUS_CODES``, Google's mapping); an overloaded server's UNAVAILABLE
# carries ``grpc-retry-pushback-ms``, which gRPC's own retry policy honours, and a google.rpc.Status
# with RetryInfo (gRPC's rich error model) in ``grpc-status-details-bin``. Every call ends in
# ``finish``: ``serving_grpc_requests_total{method, code}``, its latency, and the access line (its
# status is the HTTP one the same outcome has on REST, so the log reads the same for both). The
# ``x-request-id`` trailer names the request, as the header does on HTTP. With SERVING_TRACING the
# call continues the client's ``traceparent`` metadata as the HTTP fronts continue the header (the
# same ``Observer``: a SERVER span named after the RPC, the model's spans its children) and answers
# the server span's own ``traceparent`` in a trailer; with tracing off nothing of it runs.
"""

from __future__ import annotations

import time
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from serving.errors import BadRequest, DeadlineExceeded, ServingError
from serving.fronts.observed import Observer, tracing_activate
from serving.http.answers import answer_for_exception
from serving.http.completion import write_access
from serving.http.request import RequestState
from serving.http.security import Gate
from serving.observability import metrics
from serving.observability.context import CURRENT_REQUEST
from serving.observability.logging import AccessLog
from serving.observability.observed import OBSERVATION
from serving.protocol.v2.proto.rpc_status_pb2 import RetryInfo, Status
from serving.protocol.v2.rpcs import SERVICE, Rpc
from serving.runtime.service import InferenceService

#: The gRPC code of each HTTP status a ``ServingError`` carries (Google's HTTP mapping).
STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    405: grpc.StatusCode.UNIMPLEMENTED,
    409: grpc.StatusCode.ABORTED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    421: grpc.StatusCode.PERMISSION_DENIED,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    500: grpc.StatusCode.INTERNAL,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
METHOD = "GRPC"
#: A deadline further away than this is gRPC's "none" (it reports ~9.2e18 seconds).
NO_DEADLINE_S = 1e9


def status_code(status: int) -> grpc.StatusCode:
    """The gRPC code for an HTTP status (INTERNAL for an unlisted 5xx, else INVALID_ARGUMENT)."""
    code = STATUS_CODES.get(status)
    if code is not None:
        return code
    return grpc.StatusCode.INTERNAL if status >= 500 else grpc.StatusCode.INVALID_ARGUMENT


class GrpcRequest(RequestState):
    """A gRPC call as the request state every layer reads: its metadata are its headers.

    The constructor is the one place where a call's metadata becomes the request state (what a
    tracing front would read a ``traceparent`` from). Binary (``-bin``) metadata are left out.
    """

    __slots__ = ("metadata", "context", "rpc_path")

    def __init__(self, context: Any, rpc_path: str) -> None:
        self.metadata: dict[str, str] = {
            key: value for key, value in context.invocation_metadata() if isinstance(value, str)
        }
        self.context = context
        self.rpc_path = rpc_path
        super().__init__((), self.metadata.get("x-request-id"))

    @property
    def method(self) -> str:
        return METHOD

    @property
    def path(self) -> str:
        return self.rpc_path

    @property
    def query(self) -> str:
        return ""

    def header(self, name: str) -> str | None:
        """A metadata value by its HTTP header name (gRPC keys are lower case). There is no Host:
        the allowed-hosts check is for browsers, which cannot speak gRPC."""
        lowered = name.lower()
        return None if lowered == "host" else self.metadata.get(lowered)

    @property
    def stream(self) -> Any:
        raise BadRequest("a gRPC call has no body stream")

    @property
    def input_terminated(self) -> bool:
        return False

    def timeout(self) -> float | None:
        """The call's own deadline in seconds (the service clamps it to
        ``SERVING_MAX_CLIENT_TIMEOUT_MS``), None when it has none."""
        remaining: float | None = self.context.time_remaining()  # grpc.aio's says None for none
        if remaining is None or remaining > NO_DEADLINE_S:
            return None
        self.client_deadline = True
        if remaining <= 0:
            raise DeadlineExceeded("the call's deadline passed before it was served")
        return remaining


class GrpcCalls:
    """Runs the calls of every ``Rpc`` with the app's service, gate and access log."""

    def __init__(
        self,
        service: InferenceService,
        gate: Gate,
        access_log: AccessLog,
        observer: Observer | None = None,
    ) -> None:
        self.service = service
        self.gate = gate
        self.access_log = access_log
        self.count_in_flight = service.settings.mode == "batched"
        self.observer = observer  # tracing on: every call's span

    def method_handler(self, rpc: Rpc) -> grpc.RpcMethodHandler:
        """The unary handler gRPC calls for ``rpc``; it gets the message's bytes, parsed here."""

        def handle(data: bytes, context: grpc.ServicerContext) -> bytes:
            return self.call(rpc, data, context)

        return grpc.unary_unary_rpc_method_handler(handle)

    def call(self, rpc: Rpc, data: bytes, context: Any) -> bytes:
        """Serve one call: its answer's bytes, or its status through ``context.abort``."""
        if self.observer is not None:
            return self._traced(rpc, data, context, self.observer)
        return self._call(rpc, data, context)

    def _traced(self, rpc: Rpc, data: bytes, context: Any, observer: Observer) -> bytes:
        """``_call`` inside the call's SERVER span, the client's ``traceparent`` continued."""
        metadata = {
            key: value for key, value in context.invocation_metadata() if isinstance(value, str)
        }
        traced = observer.begin("POST", rpc.path, metadata, False)
        if traced.traced:  # named as OpenTelemetry's RPC conventions name a call
            traced.span.update_name(f"{SERVICE}/{rpc.name}")
            traced.span.set_attributes(
                {"rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": rpc.name}
            )
        observation = OBSERVATION.set(traced.observation) if traced.observation.timed else None
        span = tracing_activate(observer, traced)
        try:
            return self._call(rpc, data, context, (observer, traced))
        finally:
            if span is not None:
                observer.tracing.deactivate(span)
            if observation is not None:
                OBSERVATION.reset(observation)
            observer.end(traced)

    def _call(
        self, rpc: Rpc, data: bytes, context: Any, traced: tuple[Observer, Any] | None = None
    ) -> bytes:
        request = GrpcRequest(context, rpc.path)
        token = CURRENT_REQUEST.set(request)
        in_flight = self.service.in_flight if self.count_in_flight else None
        if in_flight is not None:
            in_flight.enter()
        try:
            error: BaseException | None = None
            try:
                self.gate.check(request, rpc)
                try:
                    message = rpc.request.FromString(data)
                except DecodeError:
                    raise BadRequest(
                        f"the message is not a valid {rpc.request.DESCRIPTOR.full_name}"
                    ) from None
                answer = rpc.handler(request, self.service, message).SerializeToString()
                status = 200
            except Exception as exc:
                error, answer = exc, b""
                status = answer_for_exception(exc, request).status  # counted and logged there
            code = grpc.StatusCode.OK if error is None else status_code(status)
            trailers: tuple[tuple[str, str | bytes], ...] = (("x-request-id", request.request_id),)
            if traced is not None:
                trailers += tuple(traced[0].answered(traced[1], status, "application/grpc"))
            retry_after = isinstance(error, ServingError) and error.headers.get("Retry-After")
            if code is grpc.StatusCode.UNAVAILABLE and retry_after and error is not None:
                trailers += retry_trailers(code, _details(error), int(retry_after))
            context.set_trailing_metadata(trailers)
            self.finish(request, status, code)
            if error is not None:
                context.abort(code, _details(error))
            return answer
        finally:
            if in_flight is not None:
                in_flight.leave()
            CURRENT_REQUEST.reset(token)

    def finish(self, request: GrpcRequest, status: int, code: grpc.StatusCode) -> None:
        """Count the answered call and write its access line."""
        elapsed = time.perf_counter() - request.started
        metrics.observe_rpc(request.rpc_path, code.name, elapsed)
        write_access(request, status, elapsed, self.access_log)


def retry_trailers(
    code: grpc.StatusCode, details: str, seconds: int
) -> tuple[tuple[str, str | bytes], ...]:
    """When to retry, both ways a client reads it: ``grpc-retry-pushback-ms`` (gRPC's own retry
    policy) and a ``google.rpc.Status`` with ``google.rpc.RetryInfo`` in ``grpc-status-details-bin``
    (gRPC's rich error model, grpcio-status' ``rpc_status.from_call``)."""
    retry = RetryInfo()
    retry.retry_delay.seconds = seconds
    status = Status(code=code.value[0], message=details)
    status.details.add().Pack(retry)
    return (
        ("grpc-retry-pushback-ms", str(seconds * 1000)),
        ("grpc-status-details-bin", status.SerializeToString()),
    )


def _details(error: BaseException) -> str:
    """What the client reads: a ``ServingError``'s message, never the internals of anything
    else."""
    return error.message if isinstance(error, ServingError) else "internal server error"
