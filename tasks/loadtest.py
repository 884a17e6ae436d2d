"""Real HTTP load against a deployment: each model once in order, then closed-loop clients
sending to random models for a fixed time."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from packing.contracts import Plan
from serving.client import Deployment, Router

SAMPLE_TEXTS = [
    "The service was quick and the staff were friendly.",
    "My order arrived late and the box was damaged.",
    "Could you tell me how to reset my password?",
    "This is the best purchase I have made all year.",
    "The meeting is moved to Thursday at three.",
]


@dataclass
class LoadResult:
    mode: str
    concurrency: int
    duration_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    per_model: dict[str, list[float]] = field(default_factory=dict)
    errors: Counter = field(default_factory=Counter)

    def record(self, model_id: str, seconds: float) -> None:
        self.latencies_s.append(seconds)
        self.per_model.setdefault(model_id, []).append(seconds)

    def summary(self) -> dict:
        lat = np.array(self.latencies_s) * 1000.0
        completed = len(self.latencies_s)
        total = completed + sum(self.errors.values())
        percentiles = (
            {f"p{p}_ms": float(np.percentile(lat, p)) for p in (50, 90, 95, 99)}
            if completed
            else {}
        )
        return {
            "mode": self.mode,
            "concurrency": self.concurrency,
            "duration_s": self.duration_s,
            "requests": total,
            "completed": completed,
            "errors": dict(self.errors),
            "error_rate": (total - completed) / total if total else 0.0,
            "requests_per_s": completed / self.duration_s if self.duration_s else 0.0,
            "min_ms": float(lat.min()) if completed else None,
            "max_ms": float(lat.max()) if completed else None,
            **percentiles,
        }


async def _one(
    http: httpx.AsyncClient, router: Router, model_id: str, text: str, result: LoadResult
) -> None:
    urls = router.urls_for(model_id)
    url = router.prediction_url(model_id, random.choice(urls))
    started = time.perf_counter()
    try:
        response = await http.post(url, json={"text": text})
    except httpx.TransportError as exc:
        result.errors[type(exc).__name__] += 1
        return
    if response.status_code == 200:
        result.record(model_id, time.perf_counter() - started)
    else:
        result.errors[f"http_{response.status_code}"] += 1


async def sequential(router: Router) -> LoadResult:
    """Every model once, one at a time: the best-case latency of each model."""
    result = LoadResult(mode="sequential", concurrency=1)
    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=30.0) as http:
        for i, model_id in enumerate(router.model_ids):
            await _one(http, router, model_id, SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)], result)
    result.duration_s = time.perf_counter() - started
    return result


async def closed_loop(
    router: Router,
    duration_s: float,
    concurrency: int,
    seed: int = 0,
    max_requests: int | None = None,
) -> LoadResult:
    """``concurrency`` clients, each sending its next request when the last one answers."""
    result = LoadResult(mode="random", concurrency=concurrency)
    rng = random.Random(seed)
    model_ids = router.model_ids
    deadline = time.perf_counter() + duration_s
    sent = 0

    async def client() -> None:
        nonlocal sent
        while time.perf_counter() < deadline and (max_requests is None or sent < max_requests):
            sent += 1
            await _one(http, router, rng.choice(model_ids), rng.choice(SAMPLE_TEXTS), result)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=30.0, limits=limits) as http:
        await asyncio.gather(*(client() for _ in range(concurrency)))
    result.duration_s = time.perf_counter() - started
    return result


def run_load_test(
    plan: Plan,
    deployment: Deployment,
    duration_s: float = 10.0,
    concurrency: int = 8,
    seed: int = 0,
) -> dict:
    router = Router(plan, deployment)
    first = asyncio.run(sequential(router))
    random_load = asyncio.run(closed_loop(router, duration_s, concurrency, seed))
    per_model_seq = {m: v[0] * 1000 for m, v in first.per_model.items()}
    return {
        "sequential": first.summary(),
        "random": random_load.summary(),
        "sequential_ms_by_model": per_model_seq,
        "random_ms_range_by_model": {
            m: [min(v) * 1000, max(v) * 1000] for m, v in random_load.per_model.items()
        },
    }


@task(name="load-test", cache_policy=NO_CACHE)
def load_test(plan_json: str, deployment: dict, duration_s: float, concurrency: int) -> dict:
    import msgspec

    plan = msgspec.json.decode(plan_json, type=Plan)
    return run_load_test(plan, msgspec.convert(deployment, Deployment), duration_s, concurrency)
