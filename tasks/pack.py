"""Turn traced profiles into a packing problem, solve it and publish the plan to the store."""

from __future__ import annotations

import json
import time

import msgspec
from prefect import task

from packing.contracts import (
    ENGINE_PRECISIONS,
    Catalog,
    Fleet,
    Limits,
    Plan,
    Problem,
    ProblemModel,
    Profile,
)
from packing.io import decode, to_json
from packing.repack import repack
from packing.solver import solve
from packing.validate import check
from serving.store import open_store
from tasks.documents import open_plan
from tasks.policy import PERSISTED, network_retries


def build_problem(
    fleet: Fleet,
    trace_results: list[dict],
    catalog: Catalog,
    limits: Limits | None = None,
    price: str = "on_demand",
    engine: str | None = None,
) -> Problem:
    """One packing model per fleet model, with a profile per processor it was traced for.

    Traffic spread over many models rarely forms batches within one model, so by default the
    packer is given the batch-1 cost per request: the conservative figure. With ``engine`` (a
    cross-model engine precision: fp32, bf16, fp16, int8) batches form across the models of a
    server, so a model costs its bytes in the engine's weight bank and its best batched seconds
    per request; models the engine cannot run (not BERT) keep the TorchScript figures.
    """
    profiles: dict[str, list[Profile]] = {}
    for result in trace_results:
        profile = result["profile"]
        engine_bytes = (profile.get("engine_bytes") or {}).get(engine) if engine else None
        if engine and engine_bytes is None and profile.get("engine_bytes") is not None:
            raise ValueError(
                f"engine precision {engine!r}: choose {', '.join(ENGINE_PRECISIONS)}"
            )
        if engine_bytes is not None:
            memory, seconds, batch = (
                int(engine_bytes),
                float(profile["seconds_per_request"]),
                int(profile["batch_size"]),
            )
        else:
            memory, seconds, batch = (
                int(profile["memory_bytes"]),
                float(profile["seconds_per_request_batch1"]),
                1,
            )
        profiles.setdefault(result["model_id"], []).append(
            Profile(
                processor=result["processor"],
                memory_bytes=memory,
                seconds_per_request=seconds,
                batch_size=batch,
            )
        )
    models = []
    for spec in fleet.all_models():
        if spec.id not in profiles:
            raise ValueError(f"model {spec.id} has no traced profile; trace it before packing")
        models.append(
            ProblemModel(
                id=spec.id,
                traffic_rps=spec.traffic_rps,
                replicas=spec.replicas,
                profiles=profiles[spec.id],
            )
        )
    return Problem(
        name=fleet.name, price=price, limits=limits or Limits(), catalog=catalog, models=models
    )


def publish_plan(plan: Plan, store_uri: str | None) -> str:
    """Write ``plans/<id>/plan.json`` (immutable) and point ``plans/latest`` at it."""
    store = open_store(store_uri)
    key = f"plans/{plan.plan_id}/plan.json"
    if not store.exists(key):
        store.put_bytes(key, to_json(plan))
    store.put_bytes("plans/latest", plan.plan_id.encode())
    return store.url_for(key)


def latest_plan(store_uri: str | None) -> Plan:
    store = open_store(store_uri)
    plan_id = store.get_bytes("plans/latest").decode().strip()
    key = f"plans/{plan_id}/plan.json"
    return decode(store.get_bytes(key), Plan, store.url_for(key))


def _current_plan(store_uri: str | None) -> Plan | None:
    store = open_store(store_uri)
    return latest_plan(store_uri) if store.exists("plans/latest") else None


@task(name="pack-models", **PERSISTED)
def pack_models(
    problem_json: str,
    store_uri: str | None,
    time_limit_s: float = 10.0,
    workers: int = 2,
    repack_tolerance: float | None = None,
) -> dict:
    """Solve afresh, or with ``repack_tolerance`` repack the store's latest plan incrementally
    (models stay where they are unless that costs more than the tolerance above a fresh
    solve)."""
    problem = decode(problem_json, Problem, "packing problem")
    started = time.perf_counter()
    current = _current_plan(store_uri) if repack_tolerance is not None else None
    moves = None
    if current is not None:
        result = repack(
            problem,
            current,
            tolerance=repack_tolerance,
            time_limit_s=time_limit_s,
            workers=workers,
        )
        plan, moves = result.plan, len(result.moves)
    else:
        plan = solve(problem, time_limit_s=time_limit_s, workers=workers)
    check(problem, plan)
    uri = publish_plan(plan, store_uri)
    return {
        "plan_uri": uri,
        "plan": json.loads(to_json(plan)),
        "wall_seconds": time.perf_counter() - started,
        "moves": moves,
    }


def plan_summary(plan: Plan, uri: str) -> dict:
    """What a pack task returns (and the Prefect database keeps): the plan's URI and figures."""
    return {
        "plan_uri": uri,
        "plan_id": plan.plan_id,
        "instances": len(plan.instances),
        "servers": len(plan.servers),
        "models": len({m for s in plan.servers for m in s.model_ids}),
        "cost_per_hour": plan.cost_per_hour,
        "lower_bound_cost_per_hour": plan.lower_bound_cost_per_hour,
        "gap": plan.gap,
        "solver_status": plan.solver_status,
    }


# Not retried: an infeasible problem or an invalid plan fails the same way every time.
@task(
    name="pack-plan",
    **PERSISTED,
    task_run_name="pack-{problem_name}",
)
def pack_plan(
    problem_json: str,
    store_uri: str | None,
    time_limit_s: float = 10.0,
    workers: int = 2,
    current_plan_uri: str | None = None,
    repack_tolerance: float | None = None,
    problem_name: str = "fleet",
) -> dict:
    """Solve afresh and publish; with ``current_plan_uri`` and ``repack_tolerance``, repack that
    plan incrementally instead. Returns the plan's URI and figures, and the moves (each a
    replica that changes server) when it repacked."""
    problem = decode(problem_json, Problem, "packing problem")
    started = time.perf_counter()
    moves = None
    fresh_cost = None
    if current_plan_uri is not None and repack_tolerance is not None:
        result = repack(
            problem,
            open_plan(current_plan_uri),
            tolerance=repack_tolerance,
            time_limit_s=time_limit_s,
            workers=workers,
        )
        plan, fresh_cost = result.plan, result.fresh_cost_per_hour
        moves = [msgspec.to_builtins(move) for move in result.moves]
    else:
        plan = solve(problem, time_limit_s=time_limit_s, workers=workers)
    check(problem, plan)
    uri = publish_plan_with_retries(plan, store_uri)
    summary = plan_summary(plan, uri)
    summary["wall_seconds"] = time.perf_counter() - started
    summary["moves"] = moves
    summary["fresh_cost_per_hour"] = fresh_cost
    return summary


def publish_plan_with_retries(plan: Plan, store_uri: str | None) -> str:
    """``publish_plan``, retried on transient store errors (the solve is not redone)."""
    from tasks.policy import NETWORK_RETRIES, is_transient

    for attempt in range(NETWORK_RETRIES + 1):
        try:
            return publish_plan(plan, store_uri)
        except Exception as exc:
            if attempt == NETWORK_RETRIES or not is_transient(exc):
                raise
            time.sleep(2 ** (attempt + 1))
    raise AssertionError("unreachable")


@task(name="read-plan", **PERSISTED, **network_retries())
def plan_figures(plan_uri: str) -> dict:
    return plan_summary(open_plan(plan_uri), plan_uri)


def latest_plan_uri(store_uri: str | None) -> str | None:
    """The URI of the store's latest plan, or None when the store holds no plan yet."""
    store = open_store(store_uri)
    if not store.exists("plans/latest"):
        return None
    plan_id = store.get_bytes("plans/latest").decode().strip()
    return store.url_for(f"plans/{plan_id}/plan.json")
