"""An optional HTTP gateway: one address for a whole deployment, routing by the plan.

``POST /predictions/{model_id}`` and ``POST /v2/models/{model_id}/infer`` are forwarded, body
and query as they came, to a replica that holds the model (in random order), moving on to the
next replica on a connection error or a 502/503/504; the answer of the first replica that
answers otherwise is passed back unchanged. Unknown models get 404 without a hop.

    myriad gateway --plan plan.json --name local --port 8000
    python -m serving.gateway --plan plan.json --deployment .myriad/deployments/local.json
"""

from __future__ import annotations

import argparse
import os
import random
from typing import Annotated

import httpx
from litestar import Litestar, Request, get, post
from litestar.datastructures import State
from litestar.params import Parameter
from litestar.plugins.problem_details import (
    ProblemDetailsConfig,
    ProblemDetailsException,
    ProblemDetailsPlugin,
)
from litestar.response import Response

from packing.contracts import Plan
from serving.client import RETRYABLE_STATUS, Deployment, Router, RoutingError

ModelIdPath = Annotated[str, Parameter(description="Model id, as in the plan")]
FORWARDED_HEADERS = ("content-type", "authorization")


async def _forward(request: Request, state: State, model_id: str, path: str) -> Response:
    router: Router = state.router
    try:
        urls = list(router.urls_for(model_id))
    except RoutingError:
        raise ProblemDetailsException(
            status_code=404,
            title="Model not found",
            detail=f"model {model_id!r} is not in the plan",
        ) from None
    random.shuffle(urls)
    body = await request.body()
    headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARDED_HEADERS}
    failures = []
    for url in urls:
        try:
            answer = await state.http.post(
                f"{url}{path}", content=body, headers=headers, params=request.query_params
            )
        except httpx.TransportError as exc:
            failures.append(f"{url}: {type(exc).__name__}")
            continue
        if answer.status_code in RETRYABLE_STATUS:
            failures.append(f"{url}: {answer.status_code}")
            continue
        return Response(
            answer.content,
            status_code=answer.status_code,
            media_type=answer.headers.get("content-type", "application/json"),
        )
    raise ProblemDetailsException(
        status_code=503,
        title="No replica answered",
        detail=f"model {model_id}: " + "; ".join(failures),
        headers={"Retry-After": "1"},
    )


@post("/predictions/{model_id:str}", status_code=200)
async def predict(request: Request, state: State, model_id: ModelIdPath) -> Response:
    return await _forward(request, state, model_id, f"/predictions/{model_id}")


@post("/v2/models/{model_id:str}/infer", status_code=200)
async def infer(request: Request, state: State, model_id: ModelIdPath) -> Response:
    return await _forward(request, state, model_id, f"/v2/models/{model_id}/infer")


@get("/v2/health/live", sync_to_thread=False)
def live() -> dict[str, bool]:
    return {"live": True}


@get("/v2/health/ready")
async def ready(state: State) -> Response[dict]:
    """Ready when every server of the deployment says it is."""
    servers = sorted(set(state.router.deployment.servers.values()))
    down = []
    for url in servers:
        try:
            answer = await state.http.get(f"{url}/v2/health/ready")
            if answer.status_code != 200:
                down.append(url)
        except httpx.TransportError:
            down.append(url)
    body = {"ready": not down, "servers": len(servers), "not_ready": down}
    return Response(body, status_code=200 if not down else 503)


def create_gateway(plan: Plan, deployment: Deployment, timeout_s: float = 30.0) -> Litestar:
    router = Router(plan, deployment)

    def open_client(app: Litestar) -> None:
        app.state.http = httpx.AsyncClient(
            timeout=timeout_s, limits=httpx.Limits(max_keepalive_connections=64)
        )

    async def close_client(app: Litestar) -> None:
        await app.state.http.aclose()

    return Litestar(
        route_handlers=[predict, infer, live, ready],
        state=State({"router": router}),
        on_startup=[open_client],
        on_shutdown=[close_client],
        plugins=[ProblemDetailsPlugin(ProblemDetailsConfig(enable_for_all_http_exceptions=True))],
        request_max_body_size=1 << 20,
    )


def main(argv: list[str] | None = None) -> None:
    from packing.io import load

    parser = argparse.ArgumentParser(prog="python -m serving.gateway", description=__doc__)
    parser.add_argument("--plan", required=True, help="plan.json of the deployment")
    parser.add_argument("--deployment", required=True, help="the deployment's JSON file")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    serve_gateway(load(args.plan, Plan), load(args.deployment, Deployment), args.host, args.port)


def serve_gateway(plan: Plan, deployment: Deployment, host: str, port: int) -> None:
    import logging

    import uvicorn

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a log line per forwarded request
    uvicorn.run(
        create_gateway(plan, deployment),
        host=host,
        port=port,
        log_level=os.environ.get("MYRIAD_LOG_LEVEL", "warning"),
    )


if __name__ == "__main__":
    main()
