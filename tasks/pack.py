"""The pack task over :func:`packing.repack.pack`; plans are published to the store by
:func:`serving.store.publish_plan`."""

from __future__ import annotations

import time

import msgspec
from prefect import task

from packing.contracts import Plan, Problem
from packing.repack import pack
from packing.solver.progress import SolveProgress, figures
from serving.store import publish_plan
from tasks.documents import open_plan, read_document
from tasks.policy import PERSISTED, network_retries


def plan_summary(plan: Plan, uri: str) -> dict:
    """What a pack task returns (and the Prefect database keeps): the plan's URI and figures,
    with the on-demand tier's promise when the plan uses it."""
    summary = {
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
    on_demand = sum(len(s.on_demand_model_ids) for s in plan.servers)
    if on_demand:
        summary["on_demand_replicas"] = on_demand
        summary["cold_fraction"] = plan.cold_fraction
        summary["cold_start_seconds"] = plan.cold_start_seconds
    return summary


# Not retried: an infeasible problem or an invalid plan fails the same way every time.
@task(
    name="pack-plan",
    **PERSISTED,
    task_run_name="pack-{problem_name}",
)
def pack_plan(
    problem_uri: str,
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
    problem = read_document(problem_uri, Problem)
    started = time.perf_counter()
    repacking = current_plan_uri is not None and repack_tolerance is not None
    current = open_plan(current_plan_uri) if repacking else None
    progress = SolveProgressArtifact(problem.name, time_limit_s)
    plan, repacked = pack(
        problem,
        current=current,
        tolerance=repack_tolerance,
        time_limit_s=time_limit_s,
        workers=workers,
        progress=progress,
    )
    progress.done(plan)
    moves = [msgspec.to_builtins(m) for m in repacked.moves] if repacked else None
    fresh_cost = repacked.fresh_cost_per_hour if repacked else None
    uri = publish_plan_with_retries(plan, store_uri, problem)
    summary = plan_summary(plan, uri)
    summary["wall_seconds"] = time.perf_counter() - started
    summary["moves"] = moves
    summary["fresh_cost_per_hour"] = fresh_cost
    return summary


class SolveProgressArtifact:
    """A progress artifact (``myriad-pack-progress``) that moves with the solve's clock against
    its time limit and names the incumbent, the bound and the gap at each improvement."""

    def __init__(self, name: str, time_limit_s: float) -> None:
        from prefect.artifacts import create_progress_artifact

        self.name = name
        self.artifact = create_progress_artifact(
            0.0, key="myriad-pack-progress", description=f"Packing {name}: {time_limit_s:.0f} s"
        )

    def __call__(self, step: SolveProgress) -> None:
        percent = min(99.0, round(100 * step.elapsed_s / max(step.time_limit_s, 1e-9), 1))
        self._update(percent, step.cost, step.bound, step.gap, f"after {step.elapsed_s:.1f} of "
                     f"{step.time_limit_s:.0f} s ({step.stage})")  # fmt: skip

    def done(self, plan: Plan) -> None:
        self._update(
            100.0, plan.cost_per_hour, plan.lower_bound_cost_per_hour, plan.gap,
            f"in {plan.solve_seconds:.1f} s ({plan.solver_status})",
        )  # fmt: skip

    def _update(
        self, percent: float, cost: float | None, bound: float | None, gap: float | None, when: str
    ) -> None:
        from prefect.artifacts import update_progress_artifact

        update_progress_artifact(
            self.artifact,
            percent,
            description=f"Packing {self.name}: {figures(cost, bound, gap)} {when}",
        )


def publish_plan_with_retries(plan: Plan, store_uri: str | None, problem: Problem) -> str:
    """``publish_plan``, retried on transient store errors (the solve is not redone)."""
    from tasks.policy import NETWORK_RETRIES, is_transient

    for attempt in range(NETWORK_RETRIES + 1):
        try:
            return publish_plan(plan, store_uri, problem)
        except Exception as exc:
            if attempt == NETWORK_RETRIES or not is_transient(exc):
                raise
            time.sleep(2 ** (attempt + 1))
    raise AssertionError("unreachable")


@task(name="read-plan", **PERSISTED, **network_retries())
def plan_figures(plan_uri: str) -> dict:
    return plan_summary(open_plan(plan_uri), plan_uri)
