"""The Litestar app of one model server: the data plane over a :class:`ModelRepository`.

Errors are typed in :mod:`serving.models` and mapped to HTTP problem details in one place here.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import threading
import time
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

from packing.contracts import is_model_id
from serving.batching import Batcher
from serving.family import DeadlineExceeded, Overloaded
from serving.metrics import ServerMetrics
from serving.models import (
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    ModelRepository,
    NotSupported,
    ServedModel,
)


class Unauthorized(PermissionError):
    pass


class Forbidden(PermissionError):
    pass


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


# Typed errors and their HTTP answers: the problem-details plugin and the metrics both read it.
ERRORS: dict[type[Exception], tuple[int, str, dict[str, str] | None]] = {
    ModelNotFound: (404, "Model not found", None),
    ModelNotReady: (503, "Model not ready", None),
    InvalidInput: (400, "Invalid input", None),
    Overloaded: (503, "Overloaded", {"Retry-After": "1"}),
    NotSupported: (409, "Not supported", None),
    Unauthorized: (401, "Unauthorized", {"WWW-Authenticate": "Bearer"}),
    Forbidden: (403, "Forbidden", None),
    DeadlineExceeded: (504, "Deadline exceeded", None),
}


async def _measured(
    state: State, model_id: str, call: Any, texts: int, batch: tuple[list[str], bool] | None = None
) -> Any:
    """Run ``call`` off the event loop (or, for ``batch`` texts of a TorchScript model, through
    the server's batcher) and record its status and latency in the metrics."""
    metrics: ServerMetrics = state.metrics
    started = time.perf_counter()
    try:
        model = state.repository.get(model_id)
        if not model.ready:
            raise ModelNotReady(model_id, model.state, model.reason)
        batcher: Batcher | None = state.batcher
        if batch is not None and batcher is not None and isinstance(model, ServedModel):
            futures = batcher.submit(model, *batch)
            result = list(await asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))
        else:
            result = await anyio.to_thread.run_sync(
                lambda: call(model), limiter=state.compute_limiter
            )
    except Exception as exc:
        status = next((v[0] for k, v in ERRORS.items() if isinstance(exc, k)), 500)
        metrics.observe(model_id, status, time.perf_counter() - started, texts)
        raise
    metrics.observe(model_id, 200, time.perf_counter() - started, texts)
    return result


@post("/predictions/{model_id:str}", status_code=200)
async def predict(request: Request, state: State, model_id: ModelIdPath) -> Any:
    try:
        texts, single = parse_texts(await request.body(), request.headers.get("content-type", ""))
    except InvalidInput:
        state.metrics.observe(model_id, 400, 0.0, 0)
        raise
    raw = request.query_params.get("raw") in ("1", "true")
    results = await _measured(
        state, model_id, lambda m: m.predict(texts, raw=raw), len(texts), (texts, raw)
    )
    return results[0] if single else results


@get("/metrics", sync_to_thread=False, media_type="text/plain; version=0.0.4")
def metrics(state: State) -> bytes:
    return state.metrics.exposition()


@get("/v2/models/{model_id:str}", sync_to_thread=False)
def model_metadata(state: State, model_id: ModelIdPath) -> dict[str, Any]:
    """KServe v2 model metadata: text in (BYTES) or token ids (INT64), tensors out."""
    model = state.repository.get(model_id)
    if model.task == "embedding":
        outputs = [{"name": "embedding", "datatype": "FP32", "shape": [-1, -1]}]
    else:
        outputs = [
            {"name": "logits", "datatype": "FP32", "shape": [-1, -1]},
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
            {"name": "score", "datatype": "FP32", "shape": [-1]},
        ]
    return {
        "name": model_id,
        "versions": [],
        "platform": "myriad",
        "inputs": [
            {"name": "text", "datatype": "BYTES", "shape": [-1]},
            {"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]},
            {"name": "attention_mask", "datatype": "INT64", "shape": [-1, -1]},
        ],
        "outputs": outputs,
    }


@post("/v2/models/{model_id:str}/infer", status_code=200)
async def infer(request: Request, state: State, model_id: ModelIdPath) -> dict[str, Any]:
    """KServe v2 inference: a BYTES ``text`` input, or INT64 ``input_ids`` (and optionally
    ``attention_mask``) the client tokenised itself."""
    try:
        body = json.loads(await request.body())
        named = {i["name"]: i for i in body["inputs"]}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        state.metrics.observe(model_id, 400, 0.0, 0)
        raise InvalidInput(f"expected a KServe v2 body with an inputs list: {exc}") from None
    request_id = body.get("id") if isinstance(body, dict) else None
    texts_input = next((i for i in named.values() if i.get("datatype") == "BYTES"), None)
    if texts_input is not None:
        texts, _ = parse_texts(json.dumps(texts_input.get("data")).encode(), "application/json")
        results = await _measured(
            state, model_id, lambda m: m.predict(texts, raw=True), len(texts), (texts, True)
        )
    elif "input_ids" in named:
        input_ids, attention_mask = _token_tensors(named)
        results = await _measured(
            state,
            model_id,
            lambda m: m.predict_ids(input_ids, attention_mask, raw=True),
            len(input_ids),
        )
    else:
        raise InvalidInput('send a BYTES input ("text") or an INT64 input ("input_ids")')
    return {
        "model_name": model_id,
        **({"id": request_id} if request_id is not None else {}),
        "outputs": _v2_outputs(results),
    }


def _token_tensors(named: dict[str, dict]) -> tuple[Any, Any]:
    import torch

    def tensor(entry: dict) -> Any:
        if entry.get("datatype") != "INT64":
            raise InvalidInput(f"input {entry.get('name')} must be INT64")
        shape = entry.get("shape")
        data = entry.get("data")
        if not (isinstance(shape, list) and len(shape) == 2 and isinstance(data, list)):
            raise InvalidInput(f"input {entry.get('name')} needs a 2-d shape and a data list")
        try:
            values = torch.tensor(data, dtype=torch.long).reshape(shape)
        except (RuntimeError, TypeError, ValueError) as exc:
            raise InvalidInput(f"input {entry.get('name')}: {exc}") from None
        if values.numel() == 0:
            raise InvalidInput(f"input {entry.get('name')} is empty")
        return values

    input_ids = tensor(named["input_ids"])
    if input_ids.shape[0] > MAX_TEXTS_PER_REQUEST:
        raise InvalidInput(f"{input_ids.shape[0]} rows; the limit is {MAX_TEXTS_PER_REQUEST}")
    mask = tensor(named["attention_mask"]) if "attention_mask" in named else None
    if mask is None:
        mask = (input_ids != 0).long()
    if mask.shape != input_ids.shape:
        raise InvalidInput("attention_mask must have the shape of input_ids")
    return input_ids, mask


def _v2_outputs(results: list[dict]) -> list[dict[str, Any]]:
    if "embedding" in results[0]:
        width = len(results[0]["embedding"])
        return [
            {
                "name": "embedding",
                "datatype": "FP32",
                "shape": [len(results), width],
                "data": [v for r in results for v in r["embedding"]],
            }
        ]
    import torch

    logits = torch.tensor([r["logits"] for r in results])
    probabilities = logits.softmax(-1)
    best = probabilities.argmax(-1)
    return [
        {
            "name": "logits",
            "datatype": "FP32",
            "shape": list(logits.shape),
            "data": logits.flatten().tolist(),
        },
        {
            "name": "label",
            "datatype": "BYTES",
            "shape": [len(results)],
            "data": [str(int(i)) for i in best],
        },
        {
            "name": "score",
            "datatype": "FP32",
            "shape": [len(results)],
            "data": probabilities.max(-1).values.tolist(),
        },
    ]


def _authorise(request: Request) -> None:
    token = os.environ.get("MYRIAD_ADMIN_TOKEN")
    if not token:
        raise Forbidden("the management API is disabled: start the server with MYRIAD_ADMIN_TOKEN")
    sent = request.headers.get("authorization", "")
    if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
        raise Unauthorized("a valid Authorization: Bearer token is required")


@post("/v2/repository/models/{model_id:str}/load", status_code=202)
async def load_model(request: Request, state: State, model_id: ModelIdPath) -> dict[str, str]:
    """Load (or reload from the store) one model; answers at once, the load runs behind."""
    _authorise(request)
    if not is_model_id(model_id):
        raise InvalidInput(f"{model_id!r} is not a valid model id")
    state.repository.load_model(model_id)
    return {"name": model_id, "status": "loading"}


@post("/v2/repository/models/{model_id:str}/unload", status_code=200)
async def unload_model(request: Request, state: State, model_id: ModelIdPath) -> dict[str, str]:
    _authorise(request)
    state.repository.unload_model(model_id)
    return {"name": model_id, "status": "unloaded"}


def create_app(
    repository: ModelRepository,
    *,
    load_on_startup: bool = True,
    workers: int = 1,
    batching: dict | None = None,
) -> Litestar:
    """Wire the app; models load in a background thread so liveness answers during the load.

    ``batching``: :class:`serving.batching.Batcher` settings for TorchScript models (None runs
    each request on its own)."""

    def start_loading(app: Litestar) -> None:
        app.state.compute_limiter = anyio.CapacityLimiter(workers)
        server_metrics: ServerMetrics = app.state.metrics
        app.state.batcher = (
            Batcher(workers=workers, on_batch=server_metrics.observe_batch, **batching)
            if batching is not None
            else None
        )
        server_metrics.batcher = app.state.batcher
        if load_on_startup:
            threading.Thread(target=repository.load_all, name="model-loader", daemon=True).start()

    def stop_batching(app: Litestar) -> None:
        # After uvicorn has drained in-flight requests: finish running batches, then stop.
        if app.state.batcher is not None:
            app.state.batcher.close()

    problem_details = ProblemDetailsPlugin(
        ProblemDetailsConfig(
            enable_for_all_http_exceptions=True,
            exception_to_problem_detail_map={
                kind: _problem(*answer) for kind, answer in ERRORS.items()
            },
        )
    )
    return Litestar(
        route_handlers=[
            ping,
            live,
            ready,
            list_models,
            model_ready,
            model_metadata,
            predict,
            infer,
            metrics,
            load_model,
            unload_model,
        ],
        state=State({"repository": repository, "metrics": ServerMetrics(repository)}),
        on_startup=[start_loading],
        on_shutdown=[stop_batching],
        plugins=[problem_details],
        request_max_body_size=MAX_BODY_BYTES,
        openapi_config=OpenAPIConfig(title="Myriad model server", version="0.1.0"),
        debug=False,
    )
