"""A real HTTP server on loopback whose latency is known: the load generator's test target.

    python tests/sleep_server.py PORT [LOW_MS HIGH_MS] [--cold-models M,M --cold-ms MS]

``POST /predictions/{model}`` answers after a uniform random sleep in [LOW_MS, HIGH_MS]
(no sleep when omitted). A model in ``--cold-models`` plays an on-demand model that never
stays loaded: every request for it waits ``--cold-ms`` more and its answer carries
``x-myriad-cold-start: 1``, as a server's answer that met a cold start does.
``POST /stall?seconds=S`` makes every request that arrives in the next S seconds wait until
they are over: a server pause (GC, swap-in) that a closed-loop generator hides and an open-loop
one exposes.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time

from aiohttp import web


def make_app(
    low_s: float, high_s: float, cold_models: frozenset[str] = frozenset(), cold_s: float = 0.0
) -> web.Application:
    state = {"stall_until": 0.0}
    rng = random.Random(1)

    async def predict(request: web.Request) -> web.Response:
        await request.read()
        stall = state["stall_until"] - time.monotonic()
        if stall > 0:
            await asyncio.sleep(stall)
        if high_s > 0:
            await asyncio.sleep(rng.uniform(low_s, high_s))
        model = request.match_info["model"]
        headers = None
        if model in cold_models:
            await asyncio.sleep(cold_s)
            headers = {"x-myriad-cold-start": "1"}
        return web.json_response({"model": model, "label": "ok"}, headers=headers)

    async def stall(request: web.Request) -> web.Response:
        seconds = float(request.query.get("seconds", "1"))
        state["stall_until"] = time.monotonic() + seconds
        return web.json_response({"stalled_s": seconds})

    async def ping(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.add_routes(
        [
            web.post("/predictions/{model}", predict),
            web.post("/stall", stall),
            web.get("/ping", ping),
        ]
    )
    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("low_ms", type=float, nargs="?", default=0.0)
    parser.add_argument("high_ms", type=float, nargs="?", default=0.0)
    parser.add_argument("--cold-models", default="")
    parser.add_argument("--cold-ms", type=float, default=0.0)
    args = parser.parse_args()
    cold = frozenset(m for m in args.cold_models.split(",") if m)
    web.run_app(
        make_app(args.low_ms / 1000, args.high_ms / 1000, cold, args.cold_ms / 1000),
        host="127.0.0.1",
        port=args.port,
        print=None,
        access_log=None,
    )
