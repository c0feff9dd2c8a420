"""``GrpcFront``: the gRPC server of one worker, next to its HTTP front, over the same parts.

# design: every gunicorn worker runs its own ``grpc.server`` (a thread pool of handler threads)
# on one shared TCP port: each binds it with SO_REUSEPORT, the kernel spreads new connections over
# the workers' sockets, and HTTP/2 keeps each connection (and all the calls multiplexed on it) on
# the worker that accepted it. It is created in the worker after fork, from gunicorn's
# post_worker_init, once the models are loaded, never in the master: grpcio's threads and pollers
# do not survive a fork, while importing grpc starts none, so the master may import this module
# (measured: no thread after import; a worker that forks never ran gRPC). The server reuses the
# worker's app parts: the same ``InferenceService`` (models, batcher, deadlines), ``Gate``
# (keys per scope), access log and metrics (``serving.fronts.grpc.calls``). The largest message
# it takes is the HTTP body cap (derived from the served models). The ThreadPoolExecutor runs the
# calls; ``maximum_concurrent_rpcs`` bounds how many are running or waiting for a thread: beyond
# it gRPC answers RESOURCE_EXHAUSTED at once instead of queueing without end. Next to the
# Open Inference Protocol's service the server answers ``grpc.health.v1.Health`` (SERVING once
# every served model is loaded in this worker, NOT_SERVING while it stops) and server
# reflection. A stop (``begin_stop``: SIGTERM, a reload, max_requests) refuses new calls at once,
# sends GOAWAY so clients reconnect to another worker, and gives the calls in flight
# ``SERVING_GRACEFUL_TIMEOUT`` to finish.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from serving.fronts.grpc.calls import GrpcCalls
from serving.fronts.observed import Observer
from serving.fronts.parts import ServingParts
from serving.protocol.v2.proto import POOL
from serving.protocol.v2.rpcs import RPCS, SERVICE
from serving.runtime.service import InferenceService

log = logging.getLogger("serving")
#: The health service's names that report this server: the whole server ("") and the protocol.
HEALTH_NAMES = ("", SERVICE)


class ReadinessHealth(health.HealthServicer):
    """``grpc.health.v1.Health`` whose Check answers NOT_SERVING while a served model is not loaded
    in this worker (model control may load and unload while serving)."""

    def __init__(self, service: InferenceService) -> None:
        super().__init__(experimental_non_blocking=True)
        self._service = service

    def Check(self, request: Any, context: Any) -> Any:  # noqa: N802 - gRPC's method name
        response = super().Check(request, context)
        if response.status == health_pb2.HealthCheckResponse.SERVING and not self._service.ready:
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.NOT_SERVING)
        return response


class GrpcFront:
    """One worker's gRPC server: built by ``start``, stopped by ``begin_stop`` and ``wait``."""

    def __init__(self, parts: ServingParts, address: str) -> None:
        self.parts = parts
        self.address = address
        settings = parts.settings
        self.threads = settings.grpc_threads or max(2, settings.threads_per_worker)
        self.grace_s = float(settings.graceful_timeout)
        self.server: grpc.Server | None = None
        self.health = ReadinessHealth(parts.service)
        self._stopped: threading.Event | None = None
        self._lock = threading.Lock()

    def options(self) -> list[tuple[str, int]]:
        """The server's channel arguments."""
        settings = self.parts.settings
        options = [
            ("grpc.so_reuseport", 1),
            ("grpc.max_receive_message_length", self.parts.service.body_limit),
        ]
        if settings.grpc_max_connection_age_s:
            options += [
                ("grpc.max_connection_age_ms", int(settings.grpc_max_connection_age_s * 1000)),
                ("grpc.max_connection_age_grace_ms", int(self.grace_s * 1000)),
            ]
        return options

    def start(self) -> int:
        """Bind the shared port and serve; the port bound (``RuntimeError`` when it cannot)."""
        settings = self.parts.settings
        server = grpc.server(
            ThreadPoolExecutor(self.threads, thread_name_prefix="grpc"),
            options=self.options(),
            maximum_concurrent_rpcs=self.threads + settings.max_queue,
        )
        observer = Observer(self.parts)
        calls = GrpcCalls(
            self.parts.service,
            self.parts.gate,
            self.parts.access_log,
            observer if observer.tracing is not None else None,
        )
        handlers = {rpc.name: calls.method_handler(rpc) for rpc in RPCS}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        server.add_registered_method_handlers(SERVICE, handlers)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server, pool=reflection_pool()
        )
        if settings.certfile:
            credentials = grpc.ssl_server_credentials(
                [(Path(settings.keyfile).read_bytes(), Path(settings.certfile).read_bytes())]
            )
            port = server.add_secure_port(self.address, credentials)
        else:
            port = server.add_insecure_port(self.address)
        if not port:  # older grpcio returns 0 instead of raising
            raise RuntimeError(f"cannot bind {self.address}")
        server.start()
        for name in HEALTH_NAMES:
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.server = server
        return port

    def begin_stop(self) -> None:
        """Refuse new calls now and let those in flight finish within the graceful timeout
        (idempotent; safe from a signal handler, which never holds gRPC's locks)."""
        with self._lock:
            if self.server is None or self._stopped is not None:
                return
            self.health.enter_graceful_shutdown()
            self._stopped = self.server.stop(self.grace_s)

    def wait(self) -> None:
        """Stop (if not begun) and wait until the calls in flight have finished."""
        self.begin_stop()
        if self._stopped is not None:
            self._stopped.wait(self.grace_s + 1.0)


_REFLECTION_POOL_READY = threading.Lock()


def reflection_pool() -> Any:
    """The package's descriptor pool with the health and reflection services' files added, so that
    reflection describes every service the server answers."""
    with _REFLECTION_POOL_READY:
        for module in (health_pb2, reflection_pb2):
            try:
                POOL.FindFileByName(module.DESCRIPTOR.name)
            except KeyError:
                POOL.AddSerializedFile(module.DESCRIPTOR.serialized_pb)
    return POOL
