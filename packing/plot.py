"""The reference's packing figure: one stacked bar per instance, a coloured segment per model,
memory and compute side by side, the caps drawn as lines."""

from __future__ import annotations

import zlib
from pathlib import Path

from packing.contracts import Plan, Problem
from packing.io import write_atomic

# Past this many instances the figure is unreadable; the rest are summarised in the title.
MAX_INSTANCES = 80


def plot_plan(problem: Problem, plan: Plan, out: Path) -> Path:
    """Write a PNG of ``plan`` to ``out`` (atomically) and return the path."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = {m.id: m for m in problem.models}
    limits = problem.limits
    instances = plan.instances[:MAX_INSTANCES]
    colours = plt.get_cmap("tab20")
    width = max(6.0, 0.35 * len(instances) + 2)
    figure, axis = plt.subplots(figsize=(min(width, 40.0), 5.0), dpi=100)
    for x, instance in enumerate(instances):
        instance_type = problem.catalog.get(instance.type)
        memory_total = instance_type.devices * instance_type.device_memory_bytes
        compute_total = instance_type.devices * instance_type.compute_capacity
        memory_bottom = compute_bottom = 0.0
        for server in (s for s in plan.servers if s.instance == instance.id):
            for model_id in server.model_ids:
                model = models[model_id]
                profile = model.profile_for(instance_type)
                if profile is None:
                    raise ValueError(f"model {model_id} has no profile for {instance.type}")
                colour = colours(zlib.crc32(model_id.encode()) % 20)
                memory = profile.memory_bytes / memory_total
                compute = model.replica_load(profile) / compute_total
                axis.bar(x - 0.2, memory, 0.38, bottom=memory_bottom, color=colour, linewidth=0)
                axis.bar(x + 0.2, compute, 0.38, bottom=compute_bottom, color=colour, linewidth=0)
                memory_bottom += memory
                compute_bottom += compute
    axis.axhline(limits.max_memory_fraction, color="black", linestyle="--", linewidth=1)
    axis.axhline(limits.max_compute_utilization, color="red", linestyle=":", linewidth=1)
    axis.set_xticks(range(len(instances)))
    axis.set_xticklabels([i.type for i in instances], rotation=90, fontsize=7)
    axis.set_ylim(0, 1.05)
    axis.set_ylabel("share of the instance (left bar memory, right bar compute)")
    shown = "" if len(plan.instances) <= MAX_INSTANCES else f", first {MAX_INSTANCES} shown"
    axis.set_title(
        f"{plan.plan_id}: {len(plan.model_ids())} models on {len(plan.instances)} instances"
        f"{shown}, ${plan.cost_per_hour:.2f}/h (gap {plan.gap:.1%})\n"
        f"caps: memory {limits.max_memory_fraction:.0%} (dashed), "
        f"compute {limits.max_compute_utilization:.0%} (dotted)",
        fontsize=9,
    )
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    write_atomic(out, buffer.getvalue())
    return out
