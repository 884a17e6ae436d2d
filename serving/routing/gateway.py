"""An optional HTTP gateway: one address for a whole deployment, routing by the plan.

``POST /predictions/{model_id}`` and ``POST /v2/models/{model_id}/infer`` are forwarded, body
and query as they came, to a replica that holds the model (in random order), moving on to the
next replica on a connection error or a 502/503/504; the answer of the first replica that
answers otherwise is passed back unchanged. Unknown models get 404 without a hop.

    myriad gateway --name local --port 8000
    python -m serving.routing.gateway --deployment .myriad/deployments/local.json

The gateway re-reads the deployment's record when a redeploy rewrites it, so requests follow
the servers of the new plan without a restart.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path
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
from packing.io import ContractError, load
from serving import settings
from serving.deployments import Deployment
from serving.routing.client import COLD_START_HEADER, Router, RoutingError, failover_reason

ModelIdPath = Annotated[str, Parameter(description="Model id, as in the plan")]
# The binary tensor extension puts the JSON header's length in a header of its own.
FORWARDED_HEADERS = ("content-type", "authorization", "inference-header-content-length")


async def _forward(
    request: Request, state: State, model_id: str, path: str, retry_on_new_routes: bool = True
) -> Response:
    router: Router = state.router
    try:
        urls = router.replicas(model_id)
    except RoutingError:
        if retry_on_new_routes and state.watcher is not None and state.watcher.refresh():
            return await _forward(request, state, model_id, path, retry_on_new_routes=False)
        raise ProblemDetailsException(
            status_code=404,
            title="Model not found",
            detail=f"model {model_id!r} is not in the plan",
        ) from None
    body = await request.body()
    headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARDED_HEADERS}
    failures = []
    for url in urls:
        try:
            answer = await state.http.post(
                f"{url}{path}", content=body, headers=headers, params=request.query_params
            )
        except httpx.TransportError as exc:
            failures.append(failover_reason(url, error=exc))
            continue
        if reason := failover_reason(url, answer.status_code):
            failures.append(reason)
            continue
        length = answer.headers.get("inference-header-content-length")
        passed = {"Inference-Header-Content-Length": length} if length else {}
        if cold := answer.headers.get(COLD_START_HEADER):
            passed[COLD_START_HEADER] = cold  # so load tests behind the gateway count it
        return Response(
            answer.content,
            status_code=answer.status_code,
            media_type=answer.headers.get("content-type", "application/json"),
            headers=passed or None,
        )
    if retry_on_new_routes and state.watcher is not None and state.watcher.refresh():
        # The record moved on under us (a redeploy): try the new plan's replicas once.
        return await _forward(request, state, model_id, path, retry_on_new_routes=False)
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


class RecordWatcher:
    """Follows a deployment's record file: when a redeploy rewrites it, the routes switch to
    the new plan's servers before the runtime stops the old ones (it waits for that)."""

    interval_s = 0.5

    def __init__(self, path: Path, state: State) -> None:
        self.path = path
        self.state = state
        self.mtime = self._mtime()

    def _mtime(self) -> int:
        try:
            return self.path.stat().st_mtime_ns
        except OSError:
            return 0

    def refresh(self) -> bool:
        """Re-read the record (and its plan) if it changed; True when the routes changed."""
        mtime = self._mtime()
        if mtime == self.mtime:
            return False
        try:
            deployment = load(self.path, Deployment)
            if deployment.plan_path is None:
                return False
            self.state.router = Router(load(deployment.plan_path, Plan), deployment)
        except (ContractError, OSError, RoutingError) as exc:
            # Half a redeploy (or a record being replaced): keep the routes that work.
            logging.getLogger(__name__).warning("deployment record not reloaded: %s", exc)
            return False
        self.mtime = mtime
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self.refresh()


def create_gateway(
    plan: Plan,
    deployment: Deployment,
    timeout_s: float = 30.0,
    record: Path | None = None,
) -> Litestar:
    """``record``: the deployment's record file, re-read when a redeploy rewrites it."""
    state = State({"router": Router(plan, deployment), "watcher": None})
    if record is not None:
        state.watcher = RecordWatcher(record, state)

    def open_client(app: Litestar) -> None:
        app.state.http = httpx.AsyncClient(
            timeout=timeout_s, limits=httpx.Limits(max_keepalive_connections=64)
        )
        if app.state.watcher is not None:
            app.state.watch_task = asyncio.get_running_loop().create_task(app.state.watcher.run())

    async def close_client(app: Litestar) -> None:
        if app.state.watcher is not None:
            app.state.watch_task.cancel()
        await app.state.http.aclose()

    return Litestar(
        route_handlers=[predict, infer, live, ready],
        state=state,
        on_startup=[open_client],
        on_shutdown=[close_client],
        plugins=[ProblemDetailsPlugin(ProblemDetailsConfig(enable_for_all_http_exceptions=True))],
        request_max_body_size=1 << 20,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m serving.routing.gateway", description=__doc__)
    parser.add_argument("--deployment", required=True, help="the deployment's JSON file")
    parser.add_argument("--plan", help="plan.json (default: the one the record names)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    serve_gateway(
        Path(args.deployment), args.host, args.port, Path(args.plan) if args.plan else None
    )


def serve_gateway(record: Path, host: str, port: int, plan_path: Path | None = None) -> None:
    """Serve a gateway for the deployment whose record is ``record``; it follows redeploys."""
    import uvicorn

    deployment = load(record, Deployment)
    plan_path = plan_path or (Path(deployment.plan_path) if deployment.plan_path else None)
    if plan_path is None:
        raise RoutingError(f"{record}: the record names no plan; give the plan file")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a log line per forwarded request
    uvicorn.run(
        create_gateway(load(plan_path, Plan), deployment, record=record),
        host=host,
        port=port,
        log_level=settings.current().server.log_level,
    )


if __name__ == "__main__":
    main()
