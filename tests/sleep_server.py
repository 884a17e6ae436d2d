"""A real HTTP server on loopback whose latency is known: the load generator's test target.

    python tests/sleep_server.py PORT [LOW_MS HIGH_MS]

``POST /predictions/{model}`` answers after a uniform random sleep in [LOW_MS, HIGH_MS]
(no sleep when omitted). ``POST /stall?seconds=S`` makes every request that arrives in the
next S seconds wait until they are over: a server pause (GC, swap-in) that a closed-loop
generator hides and an open-loop one exposes.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time

from aiohttp import web


def make_app(low_s: float, high_s: float) -> web.Application:
    state = {"stall_until": 0.0}
    rng = random.Random(1)

    async def predict(request: web.Request) -> web.Response:
        await request.read()
        stall = state["stall_until"] - time.monotonic()
        if stall > 0:
            await asyncio.sleep(stall)
        if high_s > 0:
            await asyncio.sleep(rng.uniform(low_s, high_s))
        return web.json_response({"model": request.match_info["model"], "label": "ok"})

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
    port = int(sys.argv[1])
    low_ms, high_ms = (float(sys.argv[2]), float(sys.argv[3])) if len(sys.argv) > 3 else (0, 0)
    web.run_app(
        make_app(low_ms / 1000, high_ms / 1000),
        host="127.0.0.1",
        port=port,
        print=None,
        access_log=None,
    )
