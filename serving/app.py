"""The Litestar app of one model server: the data plane over a :class:`ModelRepository`.

Errors are typed in :mod:`serving.models` and mapped to HTTP problem details in one place here.
"""

from __future__ import annotations

import json
import threading
from typing import Annotated, Any

import anyio
from litestar import Litestar, Request, get, post
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig
from litestar.params import Parameter
from litestar.plugins.problem_details import (
    ProblemDetailsConfig,
    ProblemDetailsException,
    ProblemDetailsPlugin,
)
from litestar.response import Response

from serving.family import DeadlineExceeded, Overloaded
from serving.models import InvalidInput, ModelNotFound, ModelNotReady, ModelRepository

MAX_BODY_BYTES = 1 << 20
MAX_TEXTS_PER_REQUEST = 64

ModelIdPath = Annotated[str, Parameter(description="Model id, as in the plan")]


def _problem(status: int, title: str, headers: dict[str, str] | None = None):
    def convert(exc: Exception) -> ProblemDetailsException:
        return ProblemDetailsException(
            status_code=status, title=title, detail=str(exc), headers=headers
        )

    return convert


def parse_texts(body: bytes, content_type: str) -> tuple[list[str], bool]:
    """Texts from a JSON ``{"text": str | [str]}`` / ``[str]`` body or a raw text body.

    Returns the texts and whether the caller sent a single text (so it gets one answer back).
    """
    if "json" in content_type or body[:1] in (b"{", b"["):
        try:
            payload: Any = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidInput(f"body is not valid JSON: {exc}") from None
        if isinstance(payload, dict):
            unknown = sorted(set(payload) - {"text", "texts"})
            if unknown:
                raise InvalidInput(f'unknown fields {unknown}; send {{"text": ...}}')
            payload = payload.get("text", payload.get("texts"))
        texts = payload
    else:
        try:
            texts = body.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput("raw text body is not UTF-8") from None
    single = isinstance(texts, str)
    if single:
        texts = [texts]
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise InvalidInput('"text" must be a string or a list of strings')
    if not texts:
        raise InvalidInput("no text given")
    if len(texts) > MAX_TEXTS_PER_REQUEST:
        raise InvalidInput(
            f"{len(texts)} texts in one request; the limit is {MAX_TEXTS_PER_REQUEST}"
        )
    if any(not t.strip() for t in texts):
        raise InvalidInput("empty text")
    return texts, single


@get("/ping", sync_to_thread=False)
def ping(state: State) -> dict[str, str]:
    repository: ModelRepository = state.repository
    return {"status": "Healthy" if repository.ready else "Loading"}


@get("/v2/health/live", sync_to_thread=False)
def live() -> dict[str, bool]:
    return {"live": True}


@get("/v2/health/ready", sync_to_thread=False)
def ready(state: State) -> Response[dict[str, Any]]:
    repository: ModelRepository = state.repository
    body = {"ready": repository.ready, "failed": [m.model_id for m in repository.failed()]}
    return Response(body, status_code=200 if repository.ready else 503)


@get("/models", sync_to_thread=False)
def list_models(state: State) -> dict[str, Any]:
    repository: ModelRepository = state.repository
    return {"ready": repository.ready, "models": repository.describe()}


@get("/v2/models/{model_id:str}/ready", sync_to_thread=False)
def model_ready(state: State, model_id: ModelIdPath) -> Response[dict[str, Any]]:
    model = state.repository.get(model_id)
    return Response(
        {"name": model_id, "ready": model.ready}, status_code=200 if model.ready else 503
    )


@post("/predictions/{model_id:str}", status_code=200)
async def predict(request: Request, state: State, model_id: ModelIdPath) -> Any:
    model = state.repository.get(model_id)
    if not model.ready:
        raise ModelNotReady(model_id, model.state, model.reason)
    texts, single = parse_texts(await request.body(), request.headers.get("content-type", ""))
    raw = request.query_params.get("raw") in ("1", "true")
    results = await anyio.to_thread.run_sync(
        lambda: model.predict(texts, raw=raw), limiter=state.compute_limiter
    )
    return results[0] if single else results


def create_app(
    repository: ModelRepository, *, load_on_startup: bool = True, workers: int = 1
) -> Litestar:
    """Wire the app; models load in a background thread so liveness answers during the load."""

    def start_loading(app: Litestar) -> None:
        app.state.compute_limiter = anyio.CapacityLimiter(workers)
        if load_on_startup:
            threading.Thread(target=repository.load_all, name="model-loader", daemon=True).start()

    problem_details = ProblemDetailsPlugin(
        ProblemDetailsConfig(
            enable_for_all_http_exceptions=True,
            exception_to_problem_detail_map={
                ModelNotFound: _problem(404, "Model not found"),
                ModelNotReady: _problem(503, "Model not ready"),
                InvalidInput: _problem(400, "Invalid input"),
                Overloaded: _problem(503, "Overloaded", {"Retry-After": "1"}),
                DeadlineExceeded: _problem(504, "Deadline exceeded"),
            },
        )
    )
    return Litestar(
        route_handlers=[ping, live, ready, list_models, model_ready, predict],
        state=State({"repository": repository}),
        on_startup=[start_loading],
        plugins=[problem_details],
        request_max_body_size=MAX_BODY_BYTES,
        openapi_config=OpenAPIConfig(title="Myriad model server", version="0.1.0"),
        debug=False,
    )
