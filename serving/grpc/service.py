"""KServe v2 over gRPC: ``inference.GRPCInferenceService`` (the Open Inference Protocol's
service as Triton defines it, with its ``ModelConfig`` extension) over a server's
:class:`serving.dataplane.plane.DataPlane`.

The handlers only decode, call and encode, like the REST front ends; they run on the event loop
of the data plane (``grpc.aio``), so an infer waits on the model's scheduler exactly as a REST
one does and the data plane records its metrics. Typed errors map to gRPC status codes in one
place, :data:`STATUS_CODES`: a client's mistake is never INTERNAL.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from packing.errors import MyriadError
from serving.dataplane.plane import MODEL_VERSION, DataPlane, cold_start
from serving.errors import (
    DeadlineExceeded,
    Forbidden,
    InvalidInput,
    LoadFailed,
    ModelNotFound,
    ModelNotReady,
    NotSupported,
    Overloaded,
    ServingError,
    Unauthorized,
)
from serving.grpc import codec
from serving.grpc import grpc_service_pb2 as pb
from serving.grpc.grpc_service_pb2_grpc import (
    GRPCInferenceServiceServicer,
    add_GRPCInferenceServiceServicer_to_server,
)
from serving.wire import COLD_START_HEADER

logger = logging.getLogger("myriad.grpc")

# Triton's clients lift gRPC's 4 MiB limits; a request here holds at most 64 texts or rows of
# ids, so 4 MiB each way keeps a stray client from making the server buffer more.
MAX_MESSAGE_BYTES = 4 << 20

# Typed errors and their status codes (the first of an error's classes found here wins).
STATUS_CODES: dict[type[Exception], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    ModelNotReady: grpc.StatusCode.UNAVAILABLE,
    # A full queue: retry later, as HTTP's 503 with Retry-After says.
    Overloaded: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    NotSupported: grpc.StatusCode.FAILED_PRECONDITION,
    LoadFailed: grpc.StatusCode.FAILED_PRECONDITION,
    Unauthorized: grpc.StatusCode.UNAUTHENTICATED,
    Forbidden: grpc.StatusCode.PERMISSION_DENIED,
}


# A typed error of another kind (one that carries the status it was answered with) by its
# HTTP status.
HTTP_STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def status_code(exc: BaseException) -> grpc.StatusCode:
    for kind in type(exc).__mro__:
        code = STATUS_CODES.get(kind)
        if code is not None:
            return code
    if isinstance(exc, ServingError):
        status = exc.status
        if 400 <= status < 500:
            return HTTP_STATUS_CODES.get(status, grpc.StatusCode.INVALID_ARGUMENT)
        return HTTP_STATUS_CODES.get(status, grpc.StatusCode.INTERNAL)
    return grpc.StatusCode.INTERNAL


Reply = TypeVar("Reply")
Handler = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Reply]]


def answers(handler: Handler) -> Handler:
    """An RPC whose typed errors end it with their status code and message; anything untyped is
    logged with its traceback and answered INTERNAL."""

    @functools.wraps(handler)
    async def wrapped(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await handler(self, request, context)
        except ServingError as exc:
            await context.abort(status_code(exc), str(exc))
        except Exception as exc:
            logger.exception("internal error on gRPC %s", handler.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")

    return wrapped


def _version(version: str) -> str | None:
    return version or None


class InferenceService(GRPCInferenceServiceServicer):
    """The RPCs a server answers; the others of Triton's service (shared memory, statistics,
    trace and log settings, streaming) answer UNIMPLEMENTED."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    @answers
    async def ServerLive(self, request: Any, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @answers
    async def ServerReady(self, request: Any, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.plane.ready)

    @answers
    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> Any:
        ready = self.plane.model_ready(request.name, _version(request.version))
        return pb.ModelReadyResponse(ready=ready)

    @answers
    async def ServerMetadata(self, request: Any, context: Any) -> pb.ServerMetadataResponse:
        return codec.server_metadata(self.plane.server_metadata())

    @answers
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> Any:
        return codec.model_metadata(
            self.plane.model_metadata(request.name, _version(request.version))
        )

    @answers
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> Any:
        return codec.model_config(self.plane.model_config(request.name, _version(request.version)))

    @answers
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        model_id = request.model_name
        try:
            inputs, raw = codec.decode_inputs(request)
        except InvalidInput as exc:
            self.plane.refuse(model_id, exc)
            raise
        cold_start.set(False)
        outputs = await self.plane.infer_tensors(model_id, inputs, _version(request.model_version))
        if cold_start.get():
            context.set_trailing_metadata(((COLD_START_HEADER, "1"),))
        return codec.encode_response(request, outputs, raw, MODEL_VERSION)

    @answers
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Any) -> Any:
        index = self.plane.repository_index()
        if request.ready:
            index = [entry for entry in index if entry["state"] == "READY"]
        return codec.repository_index(index)

    @answers
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        self.plane.authorise(_authorization(context))
        await self.plane.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @answers
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        self.plane.authorise(_authorization(context))
        self.plane.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()


def _authorization(context: grpc.aio.ServicerContext) -> str | None:
    """The ``authorization`` metadata (gRPC's keys are lower case), as REST's header."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value
    return None


class GrpcPortUnavailable(MyriadError):
    """The gRPC port cannot be listened on (in use, or a host this machine does not have)."""


class GrpcServer:
    """The gRPC service of one server, on the running event loop (that of its data plane)."""

    def __init__(self, plane: DataPlane, host: str, port: int) -> None:
        self.plane = plane
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.port = port
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                # One server per port: a second one must fail, not share it.
                ("grpc.so_reuseport", 0),
            ]
        )
        add_GRPCInferenceServiceServicer_to_server(InferenceService(self.plane), server)
        try:
            self.port = server.add_insecure_port(self.address)
        except RuntimeError as exc:
            raise GrpcPortUnavailable(f"cannot serve gRPC on {self.address}: {exc}") from None
        await server.start()
        self._server = server

    async def stop(self, grace_s: float = 30.0) -> None:
        """In-flight RPCs finish (within ``grace_s``); new ones are refused."""
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None


def grpc_hooks(
    host: str, port: int
) -> tuple[Callable[[Any], Awaitable[None]], Callable[[Any], Awaitable[None]]]:
    """Startup and shutdown hooks for a server's app (anything with ``state.dataplane``): the
    gRPC service starts on the app's event loop once it starts, and stops, draining, before the
    data plane closes."""
    servers: list[GrpcServer] = []

    async def start(app: Any) -> None:
        server = GrpcServer(app.state.dataplane, host, port)
        await server.start()
        servers.append(server)

    async def stop(app: Any) -> None:
        while servers:
            await servers.pop().stop()

    return start, stop
