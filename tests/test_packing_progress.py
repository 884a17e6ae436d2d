"""Progress of a solve: every improvement reported in order, the trajectory ending on the plan's
own figures, and reporting that changes nothing of the plan."""

from __future__ import annotations

import msgspec

from packing.io import to_json
from packing.solver import SolveProgress, solve, solve_with_trajectory
from tests.test_packing_deterministic import _problem


def test_progress_reports_every_improvement_and_changes_nothing() -> None:
    problem = _problem(150, 5)
    seen: list[SolveProgress] = []
    plan, trajectory = solve_with_trajectory(
        problem, time_limit_s=1.5, deterministic=True, progress=seen.append
    )
    assert seen and len(seen) == len(trajectory)
    costs = [p.cost for p in seen if p.cost is not None]
    bounds = [p.bound for p in seen if p.bound is not None]
    # The last point is the plan's figures, rounded to six places as the plan has them.
    assert all(a >= b - 1e-6 for a, b in zip(costs, costs[1:], strict=False))
    assert all(a <= b + 1e-6 for a, b in zip(bounds, bounds[1:], strict=False))
    for point in seen:
        assert point.time_limit_s == 1.5 and point.stage
        if point.cost is not None and point.bound is not None:
            assert point.bound <= point.cost + 1e-9
            assert point.gap == (point.cost - point.bound) / point.cost
    assert seen[-1].stage == "done"
    elapsed = [p.elapsed_s for p in trajectory]
    assert elapsed == sorted(elapsed)
    assert trajectory[-1].cost == plan.cost_per_hour
    assert trajectory[-1].bound == plan.lower_bound_cost_per_hour
    quiet = solve(problem, time_limit_s=1.5, deterministic=True)

    def blanked(p):
        return to_json(
            msgspec.structs.replace(p, created_at="", solve_seconds=0.0, solve_trajectory=[])
        )

    assert blanked(plan) == blanked(quiet)
    # The plan keeps its trajectory as its solve record.
    assert [point.elapsed_s for point in plan.solve_trajectory] == [
        round(point.elapsed_s, 3) for point in trajectory
    ]
    assert plan.solve_trajectory[-1].cost_per_hour == plan.cost_per_hour
