"""Progress of a solve: the incumbent cost and proven bound as they improve, for a live display
(the CLI) or an artifact (the flow), and the trajectory of (elapsed, cost, bound) they trace.
Reporting only observes the search: it changes neither its path nor its plan."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import NamedTuple


class SolveProgress(NamedTuple):
    """One improvement: wall seconds since the solve began, its time limit (a work budget in
    deterministic mode), the cheapest plan's cost so far and the best bound (dollars per hour;
    ``None`` before the first), the gap between them, and the stage that improved."""

    elapsed_s: float
    time_limit_s: float
    cost: float | None
    bound: float | None
    gap: float | None
    stage: str


def figures(cost: float | None, bound: float | None, gap: float | None) -> str:
    """``plan $1.2340/h, bound $1.2000/h, gap 2.76%``, with ``-`` for what is not known yet:
    one wording for the CLI's live line and the flow's progress artifact."""
    money = "-" if cost is None else f"${cost:.4f}/h"
    floor = "-" if bound is None else f"${bound:.4f}/h"
    ratio = "-" if gap is None else f"{gap:.2%}"
    return f"plan {money}, bound {floor}, gap {ratio}"


class TrajectoryPoint(NamedTuple):
    elapsed_s: float
    cost: float | None
    bound: float | None


class Tracker:
    """Keeps the best cost and bound seen, and on each improvement records a trajectory
    point and calls ``callback`` (if any) with a ``SolveProgress``."""

    def __init__(
        self, time_limit_s: float, callback: Callable[[SolveProgress], None] | None = None
    ) -> None:
        self.started = time.perf_counter()
        self.time_limit_s = time_limit_s
        self.callback = callback
        self.cost: float | None = None
        self.bound: float | None = None
        self.trajectory: list[TrajectoryPoint] = []

    def finish(self, cost: float, bound: float) -> None:
        """The plan's own figures (rounded as the plan has them) as the last point."""
        self.cost, self.bound = cost, bound
        self._emit("done")

    def report(self, stage: str, cost: float | None = None, bound: float | None = None) -> None:
        better_cost = cost is not None and (self.cost is None or cost < self.cost - 1e-9)
        better_bound = (
            bound is not None
            and math.isfinite(bound)
            and bound > 0
            and (self.bound is None or bound > self.bound + 1e-9)
        )
        if not (better_cost or better_bound):
            return
        if better_cost:
            self.cost = cost
        if better_bound:
            self.bound = bound
        if self.cost is not None and self.bound is not None:
            # A bound past the cost is the cost proven optimal.
            self.bound = min(self.bound, self.cost)
        self._emit(stage)

    def _emit(self, stage: str) -> None:
        elapsed = time.perf_counter() - self.started
        self.trajectory.append(TrajectoryPoint(elapsed, self.cost, self.bound))
        if self.callback is not None:
            gap = None
            if self.cost is not None and self.bound is not None:
                gap = (self.cost - self.bound) / self.cost if self.cost > 0 else 0.0
            self.callback(
                SolveProgress(elapsed, self.time_limit_s, self.cost, self.bound, gap, stage)
            )
