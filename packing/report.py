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
