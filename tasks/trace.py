"""Trace every model for every processor, fanned out over Prefect task runs."""

from __future__ import annotations

import math
import os
import threading
from dataclasses import asdict
from pathlib import Path

import msgspec
from prefect import task, unmapped

from packing.contracts import Fleet, ModelSpec
from serving import settings
from serving.build import sources
from serving.build.tracing import TraceSettings, stored_profiles, trace_key, trace_to_store
from serving.store import artifact_prefix, open_store, read_manifest
from tasks.policy import PERSISTED, network_retries

# SQLite (the embedded Prefect server) struggles with thousands of concurrent task runs, so big
# fleets are traced in chunks; small ones get one task run per model × processor.
MAX_TASK_RUNS = 64

# At most this many traces (compiles) at once in one process, whatever the task runner's
# worker count: a trace uses a core and a model's memory (settings: trace.concurrency).
_COMPILES: list[threading.BoundedSemaphore] = []
_COMPILES_LOCK = threading.Lock()


def compile_slot() -> threading.BoundedSemaphore:
    """This process's compile limit, made on first use. Tasks reach it through this function: a
    Dask worker unpickles a task's function by value, and a semaphore cannot travel, but a
    reference to this importable function can (each worker process then has its own limit)."""
    with _COMPILES_LOCK:
        if not _COMPILES:
            limit = settings.current().trace.concurrency or max(1, (os.cpu_count() or 2) // 2)
            _COMPILES.append(threading.BoundedSemaphore(limit))
        return _COMPILES[0]


def trace_jobs(fleet: Fleet) -> list[tuple[ModelSpec, str]]:
    return [(spec, proc) for spec in fleet.all_models() for proc in fleet.processors_for(spec)]


def chunk(jobs: list, max_chunks: int = MAX_TASK_RUNS) -> list[list]:
    size = max(1, math.ceil(len(jobs) / max_chunks))
    return [jobs[i : i + size] for i in range(0, len(jobs), size)]


def job_label(jobs: list[tuple[ModelSpec, str]]) -> str:
    """``bert-0042-cpu`` for one job, ``bert-0000..bert-0046-cpu`` for a chunk of one
    processor, ``bert-0000..bert-0046-cpu+gpu`` across processors."""
    first, last = jobs[0][0].id, jobs[-1][0].id
    processors = "+".join(dict.fromkeys(proc for _, proc in jobs))
    return f"{first}-{processors}" if len(jobs) == 1 else f"{first}..{last}-{processors}"


# The store is the cache: each artifact's manifest records the content hash it was traced from,
# so an unchanged model is skipped even on a fresh Prefect server or another machine. Retried
# only on network failures (the store); a parity or trace failure fails the run at once.
@task(
    name="trace-models",
    **PERSISTED,
    task_run_name="trace-{label}",
    **network_retries(),
)
def trace_models(
    jobs: list[tuple[dict, str]],
    store_uri: str | None,
    settings: dict | None = None,
    base_dir: str | None = None,
    label: str = "",
    force: bool = False,
) -> list[dict]:
    store = open_store(store_uri)
    trace_settings = msgspec.convert(settings or {}, TraceSettings)
    results = []
    for spec_dict, processor in jobs:
        spec = msgspec.convert(spec_dict, ModelSpec)
        with compile_slot():
            result = trace_to_store(
                spec,
                processor,
                store,
                trace_settings,
                base_dir=Path(base_dir) if base_dir else None,
                force=force,
            )
        results.append(asdict(result))
    return results


def submit_traces(
    fleet: Fleet,
    store_uri: str | None,
    settings: dict | None,
    base_dir: Path | None,
    jobs: list[tuple[ModelSpec, str]] | None = None,
    max_task_runs: int = MAX_TASK_RUNS,
    force: bool = False,
) -> list[dict]:
    """Map ``trace_models`` over chunks of (model, processor) jobs (default: the whole fleet)
    and wait for all of them, with a progress artifact that moves as chunks finish."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact
    from prefect.futures import as_completed

    jobs = trace_jobs(fleet) if jobs is None else jobs
    if not jobs:
        return []
    chunks = chunk(jobs, max_task_runs)
    payload = [[(msgspec.to_builtins(spec), proc) for spec, proc in c] for c in chunks]
    progress = create_progress_artifact(
        0.0, key="myriad-trace-progress", description=f"Tracing {len(jobs)} model × processor jobs"
    )
    futures = trace_models.map(
        payload,
        store_uri=unmapped(store_uri),
        settings=unmapped(settings),
        base_dir=unmapped(str(base_dir) if base_dir else None),
        label=[job_label(c) for c in chunks],
        force=unmapped(force),
    )
    done = 0
    results: dict[int, list[dict]] = {}
    index = {future.task_run_id: n for n, future in enumerate(futures)}
    for future in as_completed(list(futures)):
        results[index[future.task_run_id]] = future.result()
        done += len(results[index[future.task_run_id]])
        update_progress_artifact(progress, 100.0 * done / len(jobs))
    return [result for n in range(len(futures)) for result in results[n]]


def stale_jobs(
    fleet: Fleet,
    store_uri: str | None,
    settings: dict | None,
    base_dir: Path | None,
) -> tuple[list[tuple[ModelSpec, str]], list[tuple[ModelSpec, str]]]:
    """Split the fleet's jobs into (changed, unchanged): a job is unchanged when the store holds
    an artifact traced from the same content hash and settings (the key ``trace_to_store``
    skips on). Hashing reads each source's files, never its weights into torch."""
    store = open_store(store_uri)
    trace_settings = msgspec.convert(settings or {}, TraceSettings)
    changed, unchanged = [], []
    for spec, processor in trace_jobs(fleet):
        source = sources.resolve(spec, base_dir)
        key = trace_key(spec, processor, trace_settings, source.content_hash)
        manifest = read_manifest(store, artifact_prefix(spec.id, processor))
        if manifest is not None and manifest.metadata.get("trace_key") == key:
            unchanged.append((spec, processor))
        else:
            changed.append((spec, processor))
    return changed, unchanged


@task(name="find-changed-models", **PERSISTED, **network_retries())
def find_changed(
    fleet_uri: str, store_uri: str | None, settings: dict | None = None
) -> dict[str, list[str]]:
    """Model ids (as ``id/processor``) whose source or settings changed since their trace."""
    from tasks.documents import base_dir, read_document

    fleet = read_document(fleet_uri, Fleet)
    changed, unchanged = stale_jobs(fleet, store_uri, settings, base_dir(fleet_uri))
    return {
        "changed": [f"{spec.id}/{proc}" for spec, proc in changed],
        "unchanged": [f"{spec.id}/{proc}" for spec, proc in unchanged],
    }


@task(name="read-profiles", **PERSISTED, **network_retries())
def read_profiles(jobs: list[str], store_uri: str | None) -> list[dict]:
    """:func:`serving.build.tracing.stored_profiles` as a task."""
    return stored_profiles(jobs, store_uri)
