"""The REST front ends of one model server, over its :class:`serving.dataplane.plane.DataPlane`:
TorchServe-style routes (``/predictions``, ``/models``, problem-details errors) and KServe v2
(``/v2``: JSON or binary tensors, ``{"error": ...}`` bodies). Handlers only decode, call and
encode; errors are typed in :mod:`serving.errors` and mapped to HTTP here, in one place.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from typing import Annotated, Any

from litestar import Litestar, Request, Response, Router, get, post, route
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.exceptions import HTTPException, NotFoundException
from litestar.handlers import BaseRouteHandler
from litestar.openapi import OpenAPIConfig
from litestar.params import PathParameter, QueryParameter
from litestar.plugins.problem_details import (
    ProblemDetailsConfig,
    ProblemDetailsException,
    ProblemDetailsPlugin,
)

from serving import settings
from serving.backends.contract import ModelRepository
from serving.dataplane.metrics import ServerMetrics
from serving.dataplane.plane import DataPlane, logger
from serving.dataplane.v2 import HEADER_LENGTH
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
from serving.http.fastpath import (
    MAX_BODY_BYTES,
    Answer,
    FastPath,
    answer_call,
    infer_answer,
    predict_answer,
)

__all__ = ["create_app", "serving_app"]

ModelIdPath = Annotated[str, PathParameter(description="Model id, as in the plan")]
VersionPath = Annotated[str, PathParameter(description="Model version (each model has version 1)")]

# Typed errors and their HTTP answers: the problem-details plugin and the metrics both read it.
ERRORS: dict[type[Exception], tuple[int, str, dict[str, str] | None]] = {
    kind: (kind.status, kind.title, kind.headers)
    for kind in (
        ModelNotFound,
        ModelNotReady,
        InvalidInput,
        Overloaded,
        NotSupported,
        Unauthorized,
        Forbidden,
        DeadlineExceeded,
        LoadFailed,
    )
}


def _problem(status: int, title: str, headers: dict[str, str] | None = None):
    def convert(exc: Exception) -> ProblemDetailsException:
        return ProblemDetailsException(
            status_code=status, title=title, detail=str(exc), headers=headers
        )

    return convert


def _plane(state: State) -> DataPlane:
    return state.dataplane


# ---------------------------------------------------------------- TorchServe-style and health


@get("/ping", sync_to_thread=False)
def ping(state: State) -> dict[str, str]:
    return {"status": "Healthy" if _plane(state).ready else "Loading"}


@get("/models", sync_to_thread=False)
def list_models(state: State) -> dict[str, Any]:
    return _plane(state).models()


def _response(answer: Answer) -> Response[bytes]:
    return Response(
        answer.body,
        status_code=answer.status,
        media_type=answer.media_type,
        headers=answer.headers,
    )


@post("/predictions/{model_id:str}", status_code=200)
async def predict(request: Request, state: State, model_id: ModelIdPath) -> Response[bytes]:
    """One text (``{"text": "..."}`` or a raw text body) or a list; ``?raw=1`` for logits.
    On a running server :class:`serving.http.fastpath.FastPath` answers this route itself."""
    answer = await predict_answer(
        _plane(state),
        model_id,
        await request.body(),
        request.headers.get("content-type", ""),
        request.scope.get("query_string", b""),
    )
    return _response(answer)


@get("/metrics", sync_to_thread=False, media_type="text/plain; version=0.0.4")
def metrics(state: State) -> bytes:
    return state.metrics.exposition()


# ---------------------------------------------------------------- KServe v2


@get("/", sync_to_thread=False)
def server_metadata(state: State) -> dict[str, Any]:
    return _plane(state).server_metadata()


@get("/health/live", sync_to_thread=False)
def live() -> dict[str, bool]:
    return {"live": True}


@get("/health/ready", sync_to_thread=False)
def ready(state: State) -> Response[dict[str, Any]]:
    plane = _plane(state)
    return Response(plane.readiness(), status_code=200 if plane.ready else 503)


@get("/models/{model_id:str}", sync_to_thread=False)
def model_metadata(state: State, model_id: ModelIdPath) -> dict[str, Any]:
    return _plane(state).model_metadata(model_id)


@get("/models/{model_id:str}/versions/{version:str}", sync_to_thread=False)
def model_version_metadata(
    state: State, model_id: ModelIdPath, version: VersionPath
) -> dict[str, Any]:
    return _plane(state).model_metadata(model_id, version)


@get("/models/{model_id:str}/config", sync_to_thread=False)
def model_config(state: State, model_id: ModelIdPath) -> dict[str, Any]:
    """The model's configuration in Triton's form (what its clients' get_model_config reads)."""
    return _plane(state).model_config(model_id)


@get("/models/{model_id:str}/versions/{version:str}/config", sync_to_thread=False)
def model_version_config(
    state: State, model_id: ModelIdPath, version: VersionPath
) -> dict[str, Any]:
    return _plane(state).model_config(model_id, version)


def _readiness(state: State, model_id: str, version: str | None) -> Response[dict[str, Any]]:
    is_ready = _plane(state).model_ready(model_id, version)
    return Response({"name": model_id, "ready": is_ready}, status_code=200 if is_ready else 503)


@get("/models/{model_id:str}/ready", sync_to_thread=False)
def model_ready(state: State, model_id: ModelIdPath) -> Response[dict[str, Any]]:
    return _readiness(state, model_id, None)


@get("/models/{model_id:str}/versions/{version:str}/ready", sync_to_thread=False)
def model_version_ready(
    state: State, model_id: ModelIdPath, version: VersionPath
) -> Response[dict[str, Any]]:
    return _readiness(state, model_id, version)


async def _infer(request: Request, model_id: str, version: str | None) -> Response[bytes]:
    answer = await infer_answer(
        request.app.state.dataplane,
        model_id,
        version,
        await request.body(),
        request.headers.get(HEADER_LENGTH),
    )
    return _response(answer)


@post("/models/{model_id:str}/infer", status_code=200)
async def infer(request: Request, model_id: ModelIdPath) -> Response[bytes]:
    return await _infer(request, model_id, None)


@post("/models/{model_id:str}/versions/{version:str}/infer", status_code=200)
async def infer_version(
    request: Request, model_id: ModelIdPath, version: VersionPath
) -> Response[bytes]:
    return await _infer(request, model_id, version)


def admin_guard(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """The management routes need ``Authorization: Bearer $MYRIAD_ADMIN_TOKEN``."""
    connection.app.state.dataplane.authorise(connection.headers.get("authorization"))


@post("/repository/index", status_code=200, sync_to_thread=False)
def repository_index(state: State) -> list[dict[str, Any]]:
    return _plane(state).repository_index()


@post("/repository/models/{model_id:str}/load", guards=[admin_guard])
async def load_model(
    state: State,
    model_id: ModelIdPath,
    wait: Annotated[bool, QueryParameter(description="answer once loaded")] = True,
) -> Response[dict[str, str]]:
    """Load (or reload from the store) one model: 200 once it is loaded (the others serve
    meanwhile); with ``?wait=false``, 202 at once and the load runs behind."""
    answer = await _plane(state).load(model_id, wait)
    return Response(answer, status_code=200 if wait else 202)


@post("/repository/models/{model_id:str}/unload", status_code=200, guards=[admin_guard])
async def unload_model(state: State, model_id: ModelIdPath) -> dict[str, str]:
    return _plane(state).unload(model_id)


@route("/{rest:path}", http_method=["GET", "POST"], sync_to_thread=False)
def v2_unknown(rest: Annotated[str, PathParameter()]) -> None:
    """Any other /v2 path: a v2 error body, not the app's problem details."""
    raise NotFoundException(f"no KServe v2 route /v2/{rest.lstrip('/')}")


def v2_error(request: Request, exc: Exception) -> Response[dict[str, str]]:
    """KServe v2 error body: ``{"error": message}`` with the error's status."""
    if isinstance(exc, ServingError):
        status, message, headers = exc.status, str(exc), exc.headers
    elif isinstance(exc, HTTPException):
        status, message, headers = exc.status_code, exc.detail, exc.headers
    else:
        logger.exception("internal error on %s", request.url.path)
        status, message, headers = 500, f"internal error: {type(exc).__name__}", None
    return Response({"error": message}, status_code=status, headers=headers)


def internal_error(request: Request, exc: Exception) -> Response[dict[str, Any]]:
    """Anything untyped: logged with its traceback, answered as a 500 problem."""
    logger.exception("internal error on %s", request.url.path)
    return Response(
        {"title": "Internal error", "status": 500, "detail": type(exc).__name__},
        status_code=500,
        media_type="application/problem+json",
    )


V2_ROUTES = Router(
    path="/v2",
    route_handlers=[
        server_metadata,
        live,
        ready,
        model_metadata,
        model_version_metadata,
        model_config,
        model_version_config,
        model_ready,
        model_version_ready,
        infer,
        infer_version,
        repository_index,
        load_model,
        unload_model,
        v2_unknown,
    ],
    # Every typed error by name too: the problem-details plugin's app-wide entries would
    # otherwise win over a base class here.
    exception_handlers={
        **{kind: v2_error for kind in ERRORS},
        ServingError: v2_error,
        HTTPException: v2_error,
        Exception: v2_error,
    },
)


def create_app(
    repository: ModelRepository,
    *,
    load_on_startup: bool = True,
    workers: int = 1,
    batching: dict | None = None,
    admin_token: str | None = None,
    on_startup: Sequence[Callable[[Litestar], Any]] = (),
    on_shutdown: Sequence[Callable[[Litestar], Any]] = (),
    planned: dict | None = None,
) -> Litestar:
    """Wire the app; models load in a background thread so liveness answers during the load.

    ``batching``: :class:`serving.backends.torchscript.Batcher` settings for TorchScript models
    (None runs each request on its own). ``admin_token`` (default ``$MYRIAD_ADMIN_TOKEN``, read
    once) opens the repository's load and unload routes. ``on_startup`` hooks run after the
    load has begun, ``on_shutdown`` hooks before the backends close."""
    server_metrics = ServerMetrics(repository, planned)
    plane = DataPlane(
        repository,
        server_metrics,
        workers=workers,
        admin_token=admin_token
        if admin_token is not None
        else settings.current().server.admin_token,
    )

    def start_loading(app: Litestar) -> None:
        repository.start(workers=workers, on_batch=server_metrics.observe_batch, **(batching or {}))
        if load_on_startup:
            threading.Thread(target=repository.load_all, name="model-loader", daemon=True).start()

    def stop(app: Litestar) -> None:
        # After uvicorn has drained in-flight requests: finish running batches, then stop.
        plane.close()

    problem_details = ProblemDetailsPlugin(
        ProblemDetailsConfig(
            enable_for_all_http_exceptions=True,
            exception_to_problem_detail_map={
                kind: _problem(*answer) for kind, answer in ERRORS.items()
            },
        )
    )
    return Litestar(
        route_handlers=[ping, list_models, predict, metrics, V2_ROUTES],
        state=State({"dataplane": plane, "repository": repository, "metrics": server_metrics}),
        on_startup=[start_loading, *on_startup],
        on_shutdown=[*on_shutdown, stop],
        plugins=[problem_details],
        exception_handlers={Exception: internal_error},
        request_max_body_size=MAX_BODY_BYTES,
        openapi_config=OpenAPIConfig(title="Myriad model server", version="0.1.0"),
        debug=False,
    )


def serving_app(app: Litestar) -> FastPath:
    """What a server runs: ``app`` behind :class:`serving.http.fastpath.FastPath`, which answers
    the prediction and inference routes without the framework. Over the cross-model engine
    they are answered by the code of the front-end processes (``--workers N``) in this process
    (:class:`serving.http.frontend.FrontEnd` over a ``LocalEngine``): tokenised here, the rows
    of one turn of the loop run as one frame."""
    from serving.backends.crossmodel import CrossModelRepository
    from serving.http.frontend import FrontEnd, LocalEngine

    plane = app.state.dataplane
    if isinstance(plane.repository, CrossModelRepository):
        return FastPath(app, FrontEnd(LocalEngine(plane)))
    return FastPath(app, functools.partial(answer_call, plane))
