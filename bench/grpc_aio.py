"""The placement the server does not ship, for bench/grpc.py to measure: grpc.aio on the ASGI worker's event loop.

    BENCH_AIO_GRPC_BIND=127.0.0.1:PORT SERVING_GRPC_BIND=off SERVING_FRONT=asgi \
        gunicorn -c gunicorn.conf.py bench.grpc_aio:app

``app`` is the project's ASGI app, whose lifespan startup also starts a ``grpc.aio`` server on the worker's event
loop (uvloop under uvicorn-worker), every worker on one port (SO_REUSEPORT), as the shipped thread-pool server
does. Each call runs the same work as ``serving.fronts.grpc.calls.GrpcCalls`` (request state from the metadata,
gate, parse, the ``Rpc`` handler, the access line and metrics) in the app's own bounded request pool, the
ASGI front's way of running a handler off the loop; only the status goes back through the loop. Only the
placement differs, so bench/grpc.py compares like with like.
"""

from __future__ import annotations

import contextvars
import os
from functools import partial
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from serving.errors import BadRequest, ServingError
from serving.fronts.asgi import AsgiApp, Receive, Scope, Send, create_asgi_app
from serving.fronts.grpc.calls import GrpcCalls, GrpcRequest, status_code
from serving.http.answers import answer_for_exception
from serving.observability.context import CURRENT_REQUEST
from serving.protocol.v2.rpcs import RPCS, SERVICE, Rpc


class AioPlacement:
    """The ASGI app with a grpc.aio server started by its lifespan."""

    def __init__(self, inner: AsgiApp, address: str) -> None:
        self.inner = inner
        self.address = address
        self.calls = GrpcCalls(inner.service, inner.gate, inner.access_log)
        self.serving_parts = inner.serving_parts  # what gunicorn.conf.py's hooks look for
        self.server: grpc.aio.Server | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._start()
        await self.inner(scope, receive, send)

    async def _start(self) -> None:
        if self.server is not None:
            return
        server = grpc.aio.server(options=[("grpc.so_reuseport", 1),
                                          ("grpc.max_receive_message_length", self.inner.service.body_limit)])
        handlers = {rpc.name: grpc.unary_unary_rpc_method_handler(partial(self._handle, rpc)) for rpc in RPCS}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        server.add_insecure_port(self.address)
        await server.start()
        self.server = server

    async def _handle(self, rpc: Rpc, data: bytes, context: Any) -> bytes:
        answer, failure = await self.inner.pool.run(contextvars.copy_context().run, self._serve, rpc, data, context)
        if failure is not None:
            await context.abort(*failure)
        return answer

    def _serve(self, rpc: Rpc, data: bytes, context: Any) -> tuple[bytes, tuple[grpc.StatusCode, str] | None]:
        """GrpcCalls.call's work, in a pool thread; the abort is left to the event loop."""
        request = GrpcRequest(context, rpc.path)
        token = CURRENT_REQUEST.set(request)
        try:
            try:
                self.calls.gate.check(request, rpc)
                try:
                    message = rpc.request.FromString(data)
                except DecodeError:
                    raise BadRequest(f"the message is not a valid {rpc.request.DESCRIPTOR.full_name}") from None
                answer = rpc.handler(request, self.calls.service, message).SerializeToString()
            except Exception as error:
                status = answer_for_exception(error, request).status
                code = status_code(status)
                self.calls.finish(request, status, code)
                details = error.message if isinstance(error, ServingError) else "internal server error"
                return b"", (code, details)
            self.calls.finish(request, 200, grpc.StatusCode.OK)
            return answer, None
        finally:
            CURRENT_REQUEST.reset(token)


app = AioPlacement(create_asgi_app(), os.environ.get("BENCH_AIO_GRPC_BIND", "127.0.0.1:8001"))
