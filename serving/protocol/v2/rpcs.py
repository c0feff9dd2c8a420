"""The Open Inference Protocol's gRPC API: every RPC declared once, with its handler.

``RPCS`` is to the gRPC front what ``serving.protocol.endpoints.ENDPOINTS`` is to the HTTP fronts:
one ``Rpc`` per method of ``inference.GRPCInferenceService`` that the server implements, with its
message types and its scope (the same ``Gate`` checks it). A handler is ``handler(request, service,
message) -> message``: it never imports grpc, and it calls the same ``InferenceService``, codec,
model binding and Triton documents as the REST handlers (``serving.protocol.v2.routes``), so both
protocols give the same answers and the same errors (``ServingError``; the front maps each to its
gRPC status). Methods of Triton's service that are not listed (shared memory, streaming, trace and
log settings) answer UNIMPLEMENTED.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from serving import __version__
from serving.errors import ModelNotFound
from serving.http.request import RequestState
from serving.http.routing import Scope
from serving.protocol.v2 import grpc_codec
from serving.protocol.v2.proto import grpc_service_pb2 as pb
from serving.protocol.v2.proto import model_config_pb2
from serving.protocol.v2.routes import EXTENSIONS, version_of
from serving.protocol.v2.tensors import answer_decoded, model_metadata, output_tensors
from serving.protocol.v2.triton import model_config, statistics
from serving.runtime.model_control import ModelControl
from serving.runtime.service import InferenceService

SERVICE = "inference.GRPCInferenceService"
#: REST's extensions less the one that only REST has.
GRPC_EXTENSIONS = [name for name in EXTENSIONS if name != "binary_tensor_data"]
RpcHandler = Callable[[RequestState, InferenceService, Any], Message]


@dataclass(frozen=True)
class Rpc:
    """One method of the service: its handler, message types and who may call it."""

    name: str
    handler: RpcHandler
    request: type[Message]
    response: type[Message]
    scope: Scope = "inference"

    @property
    def path(self) -> str:
        """The method's full name on the wire, ``/inference.GRPCInferenceService/ModelInfer``."""
        return f"/{SERVICE}/{self.name}"


def _version(name: str, version: str) -> int | None:
    """The version a message names ("" = the latest served)."""
    return version_of(name, version or None)


def server_live(request: RequestState, service: InferenceService, message: Any) -> Message:
    return pb.ServerLiveResponse(live=True)


def server_ready(request: RequestState, service: InferenceService, message: Any) -> Message:
    return pb.ServerReadyResponse(ready=service.ready)


def model_ready(request: RequestState, service: InferenceService, message: Any) -> Message:
    """Ready when that version is loaded in this worker; an unknown model or version is not ready
    (Triton answers the same, where REST answers 404)."""
    try:
        key = service.key(message.name, _version(message.name, message.version))
    except ModelNotFound:  # also a version that is not a number
        return pb.ModelReadyResponse(ready=False)
    request.model = f"{key[0]}:{key[1]}"
    return pb.ModelReadyResponse(ready=service.model_ready(*key))


def server_metadata(request: RequestState, service: InferenceService, message: Any) -> Message:
    return pb.ServerMetadataResponse(
        name="serving", version=__version__, extensions=GRPC_EXTENSIONS
    )


def metadata(request: RequestState, service: InferenceService, message: Any) -> Message:
    model = service.model(message.name, _version(message.name, message.version))
    request.model = model.label
    document = model_metadata(model, service.versions(message.name))
    return json_format.ParseDict(document, pb.ModelMetadataResponse())


def infer(request: RequestState, service: InferenceService, message: Any) -> Message:
    """``ModelInfer``: decode, bind to the model (an unversioned call goes where the model's
    traffic rule sends it, as over REST), run it through the service, encode."""
    name = message.model_name
    route = service.route(name, _version(name, message.model_version), request.header)
    request.model = route.label
    decoded = grpc_codec.decode_infer(message)
    probabilities, model = answer_decoded(request, service, route, decoded)
    outputs = [tensor for tensor, _ in output_tensors(decoded, model, probabilities)]
    return grpc_codec.encode_infer(
        name,
        str(model.meta.version),
        decoded.id or request.request_id,
        outputs,
        raw=decoded.binary_output,
    )


def config(request: RequestState, service: InferenceService, message: Any) -> Message:
    model = service.model(message.name, _version(message.name, message.version))
    request.model = model.label
    document = model_config(model, service.versions(message.name), service.settings)
    return pb.ModelConfigResponse(
        config=json_format.ParseDict(document, model_config_pb2.ModelConfig())
    )


def model_statistics(request: RequestState, service: InferenceService, message: Any) -> Message:
    name = message.name or None
    version = None if name is None else _version(message.name, message.version)
    documents = statistics(service, name, version)
    return json_format.ParseDict({"model_stats": documents}, pb.ModelStatisticsResponse())


def repository_index(request: RequestState, service: InferenceService, message: Any) -> Message:
    """The served versions (all on disk for an admin key), only the ready ones when asked."""
    entries = service.index(unserved=request.admin)
    if service.settings.model_control == "explicit":
        entries = ModelControl.of(service).every_worker_index(entries, unserved=request.admin)
    if message.ready:
        entries = [entry for entry in entries if entry["state"] == "READY"]
    return json_format.ParseDict({"models": entries}, pb.RepositoryIndexResponse())


def load_model(request: RequestState, service: InferenceService, message: Any) -> Message:
    """Load a model on every worker (SERVING_MODEL_CONTROL=explicit), then answer."""
    ModelControl.of(service).load_or_unload(message.model_name, True, service.settings.timeout)
    return pb.RepositoryModelLoadResponse()


def unload_model(request: RequestState, service: InferenceService, message: Any) -> Message:
    """Every worker drains and unloads the model's versions, then the call answers."""
    ModelControl.of(service).load_or_unload(message.model_name, False, service.settings.timeout)
    return pb.RepositoryModelUnloadResponse()


RPCS: tuple[Rpc, ...] = (
    Rpc("ServerLive", server_live, pb.ServerLiveRequest, pb.ServerLiveResponse, "public"),
    Rpc("ServerReady", server_ready, pb.ServerReadyRequest, pb.ServerReadyResponse, "public"),
    Rpc("ModelReady", model_ready, pb.ModelReadyRequest, pb.ModelReadyResponse),
    Rpc("ServerMetadata", server_metadata, pb.ServerMetadataRequest, pb.ServerMetadataResponse),
    Rpc("ModelMetadata", metadata, pb.ModelMetadataRequest, pb.ModelMetadataResponse),
    Rpc("ModelInfer", infer, pb.ModelInferRequest, pb.ModelInferResponse),
    # Triton's extensions
    Rpc("ModelConfig", config, pb.ModelConfigRequest, pb.ModelConfigResponse),
    Rpc(
        "ModelStatistics",
        model_statistics,
        pb.ModelStatisticsRequest,
        pb.ModelStatisticsResponse,
    ),
    Rpc(
        "RepositoryIndex",
        repository_index,
        pb.RepositoryIndexRequest,
        pb.RepositoryIndexResponse,
        "admin",
    ),
    Rpc(
        "RepositoryModelLoad",
        load_model,
        pb.RepositoryModelLoadRequest,
        pb.RepositoryModelLoadResponse,
        "admin",
    ),
    Rpc(
        "RepositoryModelUnload",
        unload_model,
        pb.RepositoryModelUnloadRequest,
        pb.RepositoryModelUnloadResponse,
        "admin",
    ),
)
