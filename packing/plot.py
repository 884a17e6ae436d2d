"""The packing figure: one group of bars per server (one device of one instance), coloured by
resource, not by model: the device memory its models take and the compute they keep busy,
each as a share of the device, with the host memory of its instance as a step over the
instance's servers where the plan has it; the caps drawn as lines, each server's model count
written above it, and instances told apart by shaded bands. Legible at any number of models,
since a model is not a colour: :data:`PER_ROW` servers to a row, up to :data:`MAX_SERVERS`
(the rest are summarised in the title)."""

from __future__ import annotations

from pathlib import Path

from packing.contracts import Plan, Problem
from packing.io import write_atomic

# Servers per row of the figure; longer plans wrap onto more rows, up to MAX_SERVERS in all
# (past that the figure is unreadable and the rest are summarised in the title).
PER_ROW = 40
MAX_SERVERS = 200

MEMORY_COLOUR = "tab:blue"
COMPUTE_COLOUR = "tab:orange"
HOST_COLOUR = "tab:green"


def plan_figure(problem: Problem, plan: Plan):  # noqa: ANN201 - a matplotlib Figure
    """The figure :func:`plot_plan` writes, for tests and other callers to inspect."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_id = {i.id: i for i in plan.instances}
    order = {i.id: n for n, i in enumerate(plan.instances)}
    servers = sorted(plan.servers, key=lambda s: (order.get(s.instance, 0), s.device))
    shown = servers[:MAX_SERVERS]
    host_used: dict[str, int] = {}
    for server in plan.servers:
        host_used[server.instance] = host_used.get(server.instance, 0) + server.host_memory_bytes
    # Plans made before host memory was planned report none: no host step then.
    host = (
        {
            i: used / problem.catalog.get(by_id[i].type).host_memory_bytes
            for i, used in host_used.items()
        }
        if any(host_used.values())
        else {}
    )
    rows = [shown[k : k + PER_ROW] for k in range(0, len(shown), PER_ROW)] or [[]]
    per_row = min(len(shown), PER_ROW)
    width = min(max(7.0, 0.32 * per_row + 4.5), 18.0)
    columns = 5 if width >= 12 else 3
    header = 0.45 + 0.2 * -(-5 // columns)  # inches: the title and the legend's lines
    height = header + 0.5 + 3.6 * len(rows)
    figure, axes = plt.subplots(len(rows), 1, figsize=(width, height), dpi=100, squeeze=False)
    for axis, row in zip(axes[:, 0], rows, strict=True):
        _draw_row(axis, problem, by_id, order, host, row, per_row)
    rest = "" if len(servers) <= MAX_SERVERS else f", first {MAX_SERVERS} of {len(servers)} shown"
    figure.suptitle(
        f"{plan.plan_id}: {len(plan.model_ids())} models on {len(plan.servers)} servers, "
        f"{len(plan.instances)} instances{rest}; ${plan.cost_per_hour:.2f}/h (gap {plan.gap:.1%})",
        fontsize=10,
        y=1 - 0.1 / height,
        va="top",
    )
    handles, labels = axes[0, 0].get_legend_handles_labels()
    # The resources first, then the caps.
    ranked = sorted(zip(labels, handles, strict=True), key=lambda lh: "cap" in lh[0])
    labels, handles = [label for label, _ in ranked], [handle for _, handle in ranked]
    figure.legend(
        handles,
        labels,
        loc="upper center",
        bbox_to_anchor=(0.5, 1 - 0.4 / height),
        fontsize=8,
        ncol=columns,
        frameon=False,
    )
    figure.tight_layout(rect=(0, 0, 1, 1 - header / height))
    return figure


def _draw_row(axis, problem, by_id, order, host, row, slots) -> None:  # noqa: ANN001
    from matplotlib.ticker import PercentFormatter

    limits = problem.limits
    memory, compute = [], []
    for server in row:
        instance_type = problem.catalog.get(by_id[server.instance].type)
        memory.append(server.memory_bytes / instance_type.device_memory_bytes)
        compute.append(server.compute_utilization)
    xs = range(len(row))
    axis.bar([x - 0.2 for x in xs], memory, 0.4, color=MEMORY_COLOUR, label="device memory")
    axis.bar([x + 0.2 for x in xs], compute, 0.4, color=COMPUTE_COLOUR, label="compute")
    # Instances: every other one shaded (by its place in the plan, so rows agree), the host
    # memory of each as a step over its servers where the plan has it.
    start = 0
    while start < len(row):
        instance_id = row[start].instance
        end = start
        while end + 1 < len(row) and row[end + 1].instance == instance_id:
            end += 1
        if order.get(instance_id, 0) % 2:
            axis.axvspan(start - 0.5, end + 0.5, color="0.93", zorder=0)
        if host:
            axis.hlines(
                host[instance_id],
                start - 0.45,
                end + 0.45,
                color=HOST_COLOUR,
                linewidth=2.5,
                label=None if start else "host memory of the instance",
            )
        start = end + 1
    # Model counts in a line above the bars, clear of them and of the cap lines.
    for x, server in zip(xs, row, strict=True):
        axis.text(x, 1.04, str(len(server.model_ids)), ha="center", fontsize=7)
    axis.text(-0.55, 1.09, "models on each server:", fontsize=7, ha="left")
    axis.axhline(
        limits.max_memory_fraction,
        color="black",
        linestyle="--",
        linewidth=1,
        label=f"memory cap {limits.max_memory_fraction:.0%}",
    )
    axis.axhline(
        limits.max_compute_utilization,
        color="red",
        linestyle=":",
        linewidth=1,
        label=f"compute cap {limits.max_compute_utilization:.0%}",
    )
    axis.set_xticks(list(xs))
    axis.set_xticklabels([s.id for s in row], rotation=90, fontsize=7)
    axis.set_xlim(-0.6, max(slots, 1) - 0.4)  # rows share a scale: a short last row too
    axis.set_ylim(0, 1.15)
    axis.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    axis.yaxis.set_major_formatter(PercentFormatter(1.0))
    axis.set_ylabel("share used: of the device\n(host memory: of the instance)", fontsize=8)


def plot_plan(problem: Problem, plan: Plan, out: Path) -> Path:
    """Write a PNG of ``plan`` to ``out`` (atomically) and return the path."""
    import io

    import matplotlib.pyplot as plt

    figure = plan_figure(problem, plan)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    write_atomic(out, buffer.getvalue())
    return out
