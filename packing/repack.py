"""Incremental repack for redeploys: keep models where they are, within a cost tolerance.

Given the plan that is running and a changed problem (models added, removed, resized, replica
counts changed), the repack keeps every replica whose model still fits where it is, drops the
replicas of removed models, puts what is left into the spare room of kept instances and then
onto new instances (solved as a small problem of its own), and closes instances that emptied.
If that plan costs more than ``tolerance`` above a fresh solve, the fresh plan wins and every
model that changed place is reported as a move.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import msgspec

from packing.contracts import (
    Limits,
    Plan,
    PlannedInstance,
    PlannedServer,
    Problem,
    ProblemModel,
)
from packing.io import to_json
from packing.solver import solve
from packing.solver.progress import SolveProgress
from packing.validate import check, violations


class Move(msgspec.Struct, kw_only=True):
    """One replica that changes place; ``source`` None is a new replica, ``target`` None a
    removed one."""

    model_id: str
    source: str | None
    target: str | None


class Repack(msgspec.Struct, kw_only=True):
    plan: Plan
    moves: list[Move]
    kept_replicas: int
    fresh_cost_per_hour: float
    incremental: bool


@dataclass
class _Server:
    id: str
    instance: str
    device: int
    processor: str
    model_ids: list[str]


def repack(
    problem: Problem,
    current: Plan,
    *,
    tolerance: float = 0.05,
    time_limit_s: float = 10.0,
    workers: int = 2,
    deterministic: bool = False,
) -> Repack:
    """``deterministic`` is passed to both solves (see ``packing.solver.solve``)."""
    if tolerance < 0:
        raise ValueError(f"tolerance must be at least 0, got {tolerance}")
    fresh = solve(
        problem, time_limit_s=time_limit_s / 2, workers=workers, deterministic=deterministic
    )
    incremental = _incremental(problem, current, time_limit_s / 2, workers, fresh, deterministic)
    if (
        incremental is not None
        and not violations(problem, incremental)
        and incremental.cost_per_hour <= fresh.cost_per_hour * (1 + tolerance) + 1e-9
    ):
        plan, chosen = incremental, True
    else:
        plan, chosen = fresh, False
    moves = _moves(current, plan)
    before = _placements(current)
    kept = sum(1 for key in _placements(plan) if key in before)
    return Repack(
        plan=plan,
        moves=moves,
        kept_replicas=kept,
        fresh_cost_per_hour=fresh.cost_per_hour,
        incremental=chosen,
    )


def _incremental(
    problem: Problem,
    current: Plan,
    time_limit_s: float,
    workers: int,
    fresh: Plan,
    deterministic: bool = False,
) -> Plan | None:
    models = {m.id: m for m in problem.models}
    catalog = {t.name: t for t in problem.catalog.instance_types}
    limits = problem.limits
    # Keep instances whose type is still offered at this price kind, at most a (possibly
    # lowered) quota of each, the most loaded first.
    load = {i.id: 0 for i in current.instances}
    for server in current.servers:
        load[server.instance] = load.get(server.instance, 0) + len(server.model_ids)
    kept_count: dict[str, int] = {}
    instances = {}
    for instance in sorted(current.instances, key=lambda i: -load[i.id]):
        instance_type = catalog.get(instance.type)
        if instance_type is None:
            continue
        if problem.price == "spot" and instance_type.spot_per_hour is None:
            continue
        quota = problem.limits.instance_quotas.get(instance.type)
        if quota is not None and kept_count.get(instance.type, 0) >= quota:
            continue
        kept_count[instance.type] = kept_count.get(instance.type, 0) + 1
        instances[instance.id] = instance
    servers = [
        _Server(s.id, s.instance, s.device, s.processor, [])
        for s in current.servers
        if s.instance in instances
    ]
    by_id = {s.id: s for s in servers}
    placed: dict[str, list[str]] = {m: [] for m in models}  # model -> instance ids

    def demand(model: ProblemModel, instance_type_name: str) -> tuple[float, float, float] | None:
        profile = model.profile_for(catalog[instance_type_name])
        if profile is None:
            return None
        return float(profile.memory_bytes), model.replica_load(profile), float(profile.host_bytes)

    # Memory, compute and host memory (from the server's base) of each server.
    used: dict[str, list[float]] = {
        s.id: [0.0, 0.0, float(catalog[instances[s.instance].type].server_host_base_bytes)]
        for s in servers
    }
    # Host memory is the instance's, shared by its servers.
    host_used: dict[str, float] = {i: 0.0 for i in instances}
    for s in servers:
        host_used[s.instance] += used[s.id][2]

    def fits(server: _Server, model: ProblemModel) -> bool:
        instance = instances[server.instance]
        if server.instance in placed[model.id]:
            return False
        need = demand(model, instance.type)
        if need is None:
            return False
        instance_type = catalog[instance.type]
        memory_cap = limits.max_memory_fraction * instance_type.device_memory_bytes
        compute_cap = limits.max_compute_utilization * instance_type.compute_capacity
        host_cap = limits.max_memory_fraction * instance_type.host_memory_bytes
        return (
            used[server.id][0] + need[0] <= memory_cap * (1 + 1e-9)
            and used[server.id][1] + need[1] <= compute_cap * (1 + 1e-9)
            and host_used[server.instance] + need[2] <= host_cap * (1 + 1e-9)
        )

    def put(server: _Server, model: ProblemModel) -> None:
        need = demand(model, instances[server.instance].type)
        assert need is not None
        used[server.id][0] += need[0]
        used[server.id][1] += need[1]
        used[server.id][2] += need[2]
        host_used[server.instance] += need[2]
        server.model_ids.append(model.id)
        placed[model.id].append(server.instance)

    # Keep what still fits where it was, up to each model's replica count.
    for old in current.servers:
        server = by_id.get(old.id)
        if server is None:
            continue
        for model_id in old.model_ids:
            model = models.get(model_id)
            if model is not None and len(placed[model_id]) < model.replicas and fits(server, model):
                put(server, model)
    # Spare room of kept instances, then new instances for the rest.
    missing: dict[str, int] = {}
    for model in problem.models:
        for _ in range(model.replicas - len(placed[model.id])):
            target = next((s for s in servers if fits(s, model)), None)
            if target is None:
                missing[model.id] = missing.get(model.id, 0) + 1
            else:
                put(target, model)
    new_instances: list[PlannedInstance] = []
    new_servers: list[PlannedServer] = []
    if missing:
        rest = Problem(
            name=problem.name,
            price=problem.price,
            limits=_remaining_quotas(problem, instances.values()),
            catalog=problem.catalog,
            models=[
                msgspec.structs.replace(
                    models[m],
                    replicas=n,
                    # The model's traffic is shared by all its replicas.
                    traffic_rps=models[m].traffic_rps * n / models[m].replicas,
                )
                for m, n in missing.items()
            ],
        )
        try:
            extra = solve(
                rest, time_limit_s=time_limit_s, workers=workers, deterministic=deterministic
            )
        except ValueError:
            return None
        taken = {int(m.group(1)) for i in instances for m in [re.match(r"i(\d+)-", i)] if m}
        number = max(taken, default=-1) + 1
        renamed: dict[str, str] = {}
        for instance in extra.instances:
            new_id = f"i{number:03d}-{instance.type.replace('.', '-')}"
            number += 1
            renamed[instance.id] = new_id
            new_instances.append(msgspec.structs.replace(instance, id=new_id))
        for server in extra.servers:
            instance_id = renamed[server.instance]
            new_servers.append(
                msgspec.structs.replace(
                    server, id=f"{instance_id}-d{server.device}", instance=instance_id
                )
            )
    kept_servers = [s for s in servers if s.model_ids]
    kept_instances = [instances[i] for i in dict.fromkeys(s.instance for s in kept_servers)]
    planned = [
        PlannedServer(
            id=s.id,
            instance=s.instance,
            device=s.device,
            processor=s.processor,
            model_ids=sorted(s.model_ids),
            memory_bytes=round(used[s.id][0]),
            memory_capacity_bytes=round(
                limits.max_memory_fraction * catalog[instances[s.instance].type].device_memory_bytes
            ),
            compute_utilization=round(
                used[s.id][1] / catalog[instances[s.instance].type].compute_capacity, 6
            ),
            host_memory_bytes=round(used[s.id][2]),
        )
        for s in kept_servers
    ]
    instances_out = [
        msgspec.structs.replace(i, price_per_hour=catalog[i.type].price(problem.price))
        for i in kept_instances
    ] + new_instances
    cost = sum(i.price_per_hour for i in instances_out)
    lower = min(fresh.lower_bound_cost_per_hour, cost)
    servers_out = planned + new_servers
    digest = hashlib.sha256(to_json(problem) + to_json(servers_out)).hexdigest()[:12]
    return Plan(
        plan_id=f"plan-{digest}",
        created_at=fresh.created_at,
        problem=problem.name,
        price=problem.price,
        instances=instances_out,
        servers=servers_out,
        cost_per_hour=round(cost, 6),
        lower_bound_cost_per_hour=lower,
        gap=round((cost - lower) / cost, 6) if cost else 0.0,
        solver_status="incremental",
        solve_seconds=fresh.solve_seconds,
        solve_trajectory=fresh.solve_trajectory,
    )


def _remaining_quotas(problem: Problem, kept: Iterable[PlannedInstance]) -> Limits:
    counts: dict[str, int] = {}
    for instance in kept:
        counts[instance.type] = counts.get(instance.type, 0) + 1
    quotas = {
        name: max(0, quota - counts.get(name, 0))
        for name, quota in problem.limits.instance_quotas.items()
    }
    return msgspec.structs.replace(problem.limits, instance_quotas=quotas)


def _placements(plan: Plan) -> set[tuple[str, str]]:
    return {(m, s.id) for s in plan.servers for m in s.model_ids}


def _moves(current: Plan, plan: Plan) -> list[Move]:
    """Replicas that leave a server paired with replicas that arrive elsewhere, per model."""
    before = _placements(current)
    after = _placements(plan)
    gone: dict[str, list[str]] = {}
    came: dict[str, list[str]] = {}
    for model_id, server_id in sorted(before - after):
        gone.setdefault(model_id, []).append(server_id)
    for model_id, server_id in sorted(after - before):
        came.setdefault(model_id, []).append(server_id)
    moves = []
    for model_id in sorted(set(gone) | set(came)):
        sources = gone.get(model_id, [])
        targets = came.get(model_id, [])
        for k in range(max(len(sources), len(targets))):
            moves.append(
                Move(
                    model_id=model_id,
                    source=sources[k] if k < len(sources) else None,
                    target=targets[k] if k < len(targets) else None,
                )
            )
    return moves


def pack(
    problem: Problem,
    *,
    current: Plan | None = None,
    tolerance: float | None = None,
    time_limit_s: float = 10.0,
    workers: int = 2,
    deterministic: bool = False,
    progress: Callable[[SolveProgress], None] | None = None,
) -> tuple[Plan, Repack | None]:
    """What the pack task and ``myriad pack`` both run: a fresh solve, or with ``current`` and
    ``tolerance`` an incremental repack of it; the plan is validated against the problem
    before it is returned (with the repack's moves, when it repacked). ``progress`` sees each
    improvement of a fresh solve."""
    if current is not None and tolerance is not None:
        result = repack(
            problem,
            current,
            tolerance=tolerance,
            time_limit_s=time_limit_s,
            workers=workers,
            deterministic=deterministic,
        )
        plan: Plan = result.plan
    else:
        result = None
        plan = solve(
            problem,
            time_limit_s=time_limit_s,
            workers=workers,
            deterministic=deterministic,
            progress=progress,
        )
    check(problem, plan)
    return plan, result
