"""Trace every model for every processor, fanned out over Prefect task runs."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import msgspec
from prefect import task, unmapped
from prefect.cache_policies import NO_CACHE

from packing.contracts import Fleet, ModelSpec
from serving.store import open_store
from serving.tracing import TraceSettings, trace_to_store

# SQLite (the embedded Prefect server) struggles with thousands of concurrent task runs, so big
# fleets are traced in chunks; small ones get one task run per model × processor.
MAX_TASK_RUNS = 64


def trace_jobs(fleet: Fleet) -> list[tuple[ModelSpec, str]]:
    return [(spec, proc) for spec in fleet.all_models() for proc in fleet.processors_for(spec)]


def chunk(jobs: list, max_chunks: int = MAX_TASK_RUNS) -> list[list]:
    size = max(1, math.ceil(len(jobs) / max_chunks))
    return [jobs[i : i + size] for i in range(0, len(jobs), size)]


# The store is the cache: each artifact's manifest records the content hash it was traced from,
# so an unchanged model is skipped even on a fresh Prefect server or another machine.
@task(
    name="trace-models",
    retries=2,
    retry_delay_seconds=2,
    cache_policy=NO_CACHE,
    task_run_name="trace-{jobs[0][0][id]}-{jobs[0][1]}+{extra}",
)
def trace_models(
    jobs: list[tuple[dict, str]],
    store_uri: str | None,
    settings: dict | None = None,
    base_dir: str | None = None,
    extra: int = 0,
) -> list[dict]:
    store = open_store(store_uri)
    trace_settings = msgspec.convert(settings or {}, TraceSettings)
    results = []
    for spec_dict, processor in jobs:
        spec = msgspec.convert(spec_dict, ModelSpec)
        result = trace_to_store(
            spec, processor, store, trace_settings, base_dir=Path(base_dir) if base_dir else None
        )
        results.append(asdict(result))
    return results


def submit_traces(
    fleet: Fleet, store_uri: str | None, settings: dict | None, base_dir: Path | None
) -> list[dict]:
    """Map ``trace_models`` over chunks of (model, processor) jobs and wait for all of them."""
    chunks = chunk(trace_jobs(fleet))
    payload = [[(msgspec.to_builtins(spec), proc) for spec, proc in c] for c in chunks]
    futures = trace_models.map(
        payload,
        store_uri=unmapped(store_uri),
        settings=unmapped(settings),
        base_dir=unmapped(str(base_dir) if base_dir else None),
        extra=[len(c) - 1 for c in chunks],
    )
    return [result for future in futures for result in future.result()]
