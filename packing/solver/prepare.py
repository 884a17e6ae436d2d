"""Preparation: the problem's instance types and classes of interchangeable models, the
refusal (naming the models) of what no plan can hold, types another type beats, and the
counting bounds the later stages share."""

from __future__ import annotations

from collections.abc import Callable

from packing.contracts import InstanceType, Problem
from packing.solver.model import (
    EPS,
    Class,
    Demand,
    Device,
    InfeasibleError,
    Type,
    fits_in,
    name_models,
)


def types_of(
    problem: Problem, reserve: Callable[[InstanceType], tuple[float, float]] | None = None
) -> list[Type]:
    """The instance types a plan may use, with each device's capacities; ``reserve`` gives the
    device and host memory each device of a type keeps out of them (the on-demand tier's room
    to load a model)."""
    limits = problem.limits
    types = []
    for spec in problem.catalog.instance_types:
        quota = limits.instance_quotas.get(spec.name)
        if quota == 0:
            continue
        price = spec.spot_per_hour if problem.price == "spot" else spec.on_demand_per_hour
        if price is None:
            continue
        memory_cap = limits.max_memory_fraction * spec.device_memory_bytes
        compute_cap = limits.max_compute_utilization * spec.compute_capacity
        host_cap = (
            limits.max_memory_fraction * spec.host_memory_bytes / spec.devices
            - spec.server_host_base_bytes
        )
        if reserve is not None:
            kept_device, kept_host = reserve(spec)
            memory_cap -= kept_device
            host_cap -= kept_host
        types.append(
            Type(
                index=len(types),
                spec=spec,
                price=price,
                devices=spec.devices,
                memory_cap=memory_cap,
                compute_cap=compute_cap,
                quota=quota,
                host_cap=host_cap,
                host_binds=_host_binds(problem, spec, memory_cap, compute_cap, host_cap),
            )
        )
    if not types:
        what = "a spot price" if problem.price == "spot" else "a quota above zero"
        raise InfeasibleError(
            f"no instance type in catalog {problem.catalog.name!r} has {what}; "
            f"nothing can be placed"
        )
    return types


def _host_binds(
    problem: Problem, spec: InstanceType, memory_cap: float, compute_cap: float, host_cap: float
) -> bool:
    """Whether host memory can bind on this type: not where every model's share of it is at
    most its share of device memory (as on CPUs, where they are one memory), or every model's
    at most its share of compute; then the other check implies it."""
    if host_cap <= 0:
        return True  # a server's base fills the RAM: nothing fits (check_feasible says so)
    below_memory = below_compute = True
    for model in problem.models:
        profile = model.profile_for(spec)
        if profile is None:
            continue
        host = profile.host_bytes / host_cap
        below_memory = below_memory and host <= profile.memory_bytes / memory_cap * (1 + EPS)
        below_compute = below_compute and host <= model.replica_load(profile) / compute_cap
        if not (below_memory or below_compute):
            return True
    return False


def classes_of(problem: Problem, types: list[Type]) -> list[Class]:
    grouped: dict[tuple, Class] = {}
    for model in problem.models:
        options: dict[int, Demand] = {}
        for t in types:
            profile = model.profile_for(t.spec)
            if profile is None:
                continue
            options[t.index] = Demand(
                float(profile.memory_bytes), model.replica_load(profile), float(profile.host_bytes)
            )
        key = (model.replicas, tuple(sorted(options.items())))
        group = grouped.get(key)
        if group is None:
            grouped[key] = Class([model.id], model.replicas, options)
        else:
            group.model_ids.append(model.id)
    return list(grouped.values())


def check_feasible(problem: Problem, types: list[Type], classes: list[Class]) -> None:
    """Refuse, naming the models, what no plan can hold; prune options that cannot fit."""
    by_type = {t.index: t for t in types}
    limits = problem.limits
    problems: list[str] = []
    for group in classes:
        names = name_models(group.model_ids)
        if not group.options:
            problems.append(
                f"{names}: no profile matches any instance type of catalog "
                f"{problem.catalog.name!r} (with {problem.price} prices and quotas)"
            )
            continue
        fitting = {i: o for i, o in group.options.items() if by_type[i].holds(o)}
        if not fitting:
            memory = min(o.memory for o in group.options.values())
            compute = min(o.compute for o in group.options.values())
            host = min(o.host for o in group.options.values())
            largest = max(by_type[i].memory_cap for i in group.options)
            strongest = max(by_type[i].compute_cap for i in group.options)
            roomiest = max(by_type[i].host_cap for i in group.options)
            if roomiest <= 0:
                bases = sorted({by_type[i].spec.server_host_base_gib for i in group.options})
                problems.append(
                    f"{names}: every instance type it runs on "
                    f"({', '.join(sorted(by_type[i].name for i in group.options))}) is too "
                    f"small for a server's base of {', '.join(map(str, bases))} GiB of host "
                    f"memory at max_memory_fraction {limits.max_memory_fraction}"
                )
            elif not any(by_type[i].holds(Demand(memory, 0.0)) for i in group.options):
                problems.append(
                    f"{names}: needs {memory / 2**30:.2f} GiB per replica, more than any "
                    f"device allows ({largest / 2**30:.2f} GiB at max_memory_fraction "
                    f"{limits.max_memory_fraction})"
                )
            elif not any(by_type[i].holds(Demand(0.0, compute)) for i in group.options):
                problems.append(
                    f"{names}: needs {compute:.3f} device-seconds per second per replica "
                    f"(traffic / replicas × seconds per request), more than any device allows "
                    f"({strongest:.3f} at max_compute_utilization "
                    f"{limits.max_compute_utilization}); raise replicas"
                )
            elif not any(by_type[i].holds(Demand(0.0, 0.0, host)) for i in group.options):
                problems.append(
                    f"{names}: needs {host / 2**30:.2f} GiB of host memory per replica, more "
                    f"than any server has beside its base ({max(roomiest, 0) / 2**30:.2f} GiB "
                    f"per device at max_memory_fraction {limits.max_memory_fraction})"
                )
            else:
                problems.append(
                    f"{names}: no single device holds its memory, compute and host memory "
                    f"demand together"
                )
            continue
        group.options = fitting
        quotas = [by_type[i].quota for i in fitting]
        if all(q is not None for q in quotas) and sum(quotas) < group.replicas:
            problems.append(
                f"{names}: {group.replicas} replicas need {group.replicas} instances, but "
                f"limits.instance_quotas allow only {sum(quotas)} of the types that fit "
                f"({', '.join(sorted(by_type[i].name for i in fitting))})"
            )
    if problems:
        raise InfeasibleError("no plan is possible: " + "; ".join(problems))


def drop_dominated(types: list[Type], classes: list[Class]) -> list[Type]:
    """Remove types another type beats on price and every capacity for every class."""

    def dominates(a: Type, b: Type) -> bool:
        if a.quota is not None or a.devices != b.devices or a.price > b.price:
            return False
        if a.memory_cap < b.memory_cap or a.compute_cap < b.compute_cap:
            return False
        # Raw host capacities compare soundly whether or not host memory binds on either.
        if a.host_binds and a.host_cap < b.host_cap:
            return False
        for group in classes:
            option_b = group.options.get(b.index)
            if option_b is None:
                continue
            option_a = group.options.get(a.index)
            if (
                option_a is None
                or option_a.memory > option_b.memory
                or option_a.compute > option_b.compute
                or (a.host_binds and option_a.host > option_b.host)
            ):
                return False
        return True

    kept = []
    for b in types:
        beaten = any(
            dominates(a, b) and (a.price < b.price or a.index < b.index or not dominates(b, a))
            for a in types
            if a is not b
        )
        if not beaten:
            kept.append(b)
    kept_ids = {t.index for t in kept}
    for group in classes:
        group.options = {i: o for i, o in group.options.items() if i in kept_ids}
    return kept


def per_instance(group: Class, t: Type) -> int:
    """How many replicas of one class alone fit on one instance of ``t``."""
    per_device = fits_in(t.free(Device()), group.options[t.index], group.total_replicas)
    return max(0, min(per_device * t.devices, group.count))


def instance_bound(t: Type, classes: list[Class]) -> int:
    """No plan needs more instances of ``t`` than the replicas that can go there."""
    replicas = sum(c.total_replicas for c in classes if t.index in c.options)
    return replicas if t.quota is None else min(replicas, t.quota)


def quota_message(types: list[Type], classes: list[Class]) -> str:
    limited = {t.index: t for t in types if t.quota is not None}
    stuck = [
        m for g in classes if g.options and set(g.options) <= set(limited) for m in g.model_ids
    ]
    quotas = ", ".join(f"{t.name}: {t.quota}" for t in limited.values())
    if stuck:
        return (
            f"no plan is possible within limits.instance_quotas ({quotas}): "
            f"{name_models(stuck)} can only run on those types and do not fit in them"
        )
    return f"no plan is possible within limits.instance_quotas ({quotas})"
