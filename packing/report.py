"""Cost figures of a plan, in the shape of the reference's packing table."""

from __future__ import annotations

from collections import Counter

from packing.contracts import Plan, Problem


def plan_table(problem: Problem, plan: Plan) -> list[dict]:
    """One row per instance type: count, models per instance, price per instance-hour and per
    model-hour (the instance price shared by the distinct models it hosts), and a total row."""
    models_on: dict[str, set[str]] = {}
    for server in plan.servers:
        models_on.setdefault(server.instance, set()).update(server.model_ids)
    instances_of: dict[str, list[str]] = {}
    for instance in plan.instances:
        instances_of.setdefault(instance.type, []).append(instance.id)
    prices = {i.type: i.price_per_hour for i in plan.instances}
    rows = []
    for type_name in sorted(instances_of, key=lambda name: (-prices[name], name)):
        ids = instances_of[type_name]
        counts = Counter(len(models_on.get(i, ())) for i in ids)
        per_instance = [len(models_on.get(i, ())) for i in ids]
        hosted = sum(per_instance)
        price = prices[type_name]
        rows.append(
            {
                "instance type": type_name,
                "instances": len(ids),
                "models per instance": _span(min(counts), max(counts)),
                "price per instance-hour": f"${price:.4f}",
                "cost per hour": f"${price * len(ids):.4f}",
                "price per model-hour": f"${price * len(ids) / hosted:.5f}" if hosted else "-",
            }
        )
    distinct = len(plan.model_ids())
    rows.append(
        {
            "instance type": "total",
            "instances": len(plan.instances),
            "models per instance": f"{distinct} models",
            "price per instance-hour": "",
            "cost per hour": f"${plan.cost_per_hour:.4f}",
            "price per model-hour": f"${plan.cost_per_hour / distinct:.5f}" if distinct else "-",
        }
    )
    return rows


def _span(low: int, high: int) -> str:
    return str(low) if low == high else f"{low}-{high}"


def on_demand_figures(problem: Problem, plan: Plan) -> dict | None:
    """The on-demand tier's part of a plan (None when every model is resident): how many
    models load on demand, the memory kept for them, and the promise, the expected share of
    requests that meet a cold start and the longest cold start, against the problem's limits
    (the plan's P90 is its resident P90; these bound the cold tail)."""
    on_demand = {m for s in plan.servers for m in s.on_demand_model_ids}
    if not on_demand:
        return None
    limits = problem.limits.on_demand
    return {
        "on-demand models": len(on_demand),
        "resident models": len(set(plan.model_ids()) - on_demand),
        "cache memory": sum(s.cache_memory_bytes for s in plan.servers),
        "cold fraction": plan.cold_fraction,
        "max cold fraction": None if limits is None else limits.max_cold_fraction,
        "cold start seconds": plan.cold_start_seconds,
        "max cold start seconds": None if limits is None else limits.max_cold_start_seconds,
    }


def cold_start_line(problem: Problem, plan: Plan) -> str:
    """The on-demand tier's figures in a sentence (empty when every model is resident)."""
    figures = on_demand_figures(problem, plan)
    if figures is None:
        return ""
    limit = figures["max cold fraction"]
    within = f" (limit {limit:.2%})" if limit is not None else ""
    return (
        f"on demand: {figures['on-demand models']} models ({figures['resident models']} "
        f"resident), {figures['cache memory'] / 2**30:.2f} GiB of cache; an expected "
        f"{figures['cold fraction']:.3%} of requests meet a cold start{within}, each at most "
        f"{figures['cold start seconds']:.2f} s"
    )
