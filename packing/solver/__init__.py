"""Place every model replica on the cheapest set of instances, with a proven lower bound.

The solver works in layers:

1. **Classes.** Models whose replica count and per-type demands are identical are
   interchangeable, so they are aggregated into one class with a count. A fleet of 3,000
   look-alike models becomes one class, not 3,000 × bins booleans.
2. **Aggregated model (CP-SAT).** Integer ``x[c, t]`` (replicas of class ``c`` on type ``t``) and
   ``y[t]`` (instances of type ``t``) under per-type volume constraints for memory and compute,
   an anti-affinity bound (an instance holds at most one replica of each model) and a
   "big item" bound (at most one replica larger than half a device per device). Every plan is
   a solution of this model, so its proven bound is a lower bound on any plan's cost. It is
   warm-started from a greedy (cheapest cost per replica) solution.
3. **Realisation.** Each type's replicas are packed onto devices first-fit-decreasing by
   dominant share, opening extra instances if fragmentation demands it, then model ids are
   dealt to the replica slots so that no instance holds two replicas of one model, and
   instances are moved to a cheaper type where their contents fit.

Small problems (few models) are then solved exactly at device level with CP-SAT, warm-started
from the realisation, with symmetry breaking between identical instances. Larger ones get two
more things:

4. **Whole-instance bound (SCIP).** The volume model with integer instance counts but
   fractional replicas: one integer per type, so SCIP's branch and bound gets far in seconds,
   on a thread beside the search. A fractional instance of a dear type is most of the LP's
   gap at fleet scale, so this bound is the one reported when it is higher.
5. **Starts and neighbourhood search.** SCIP's solution of the same model keeps its
   instances: each type's replicas are packed onto them exactly (device by device as
   knapsacks, then by CP-SAT as a whole), and the few replicas whole devices leave over go to
   spare room or the cheapest fresh instances. The same model with 1-3% of every device held
   back gives other starts, realised first-fit. The cheapest start (these or the CP-SAT
   realisation) goes through a large-neighbourhood search: a few instances at a time, or every
   instance of one processor kind, are emptied and re-packed exactly on any mix of types.

The stages are modules, in dependency order: ``model`` (types, classes, devices, instances, the
demand pair and the scales), ``prepare``, ``cpsat`` (the clock every solve is set up on and the
slot model), ``bounds`` (the volume models: layers 2 and 4), ``realise`` (layer 3), ``exact``
(the device-level searches and re-packs), ``fill`` and ``neighbourhood`` (layer 5),
``assemble`` (the plan) and ``schedule`` (``solve``: what runs when, on what share of the time).
"""

from packing.solver.model import InfeasibleError
from packing.solver.progress import SolveProgress, TrajectoryPoint
from packing.solver.schedule import solve, solve_with_trajectory

__all__ = ["InfeasibleError", "SolveProgress", "TrajectoryPoint", "solve", "solve_with_trajectory"]
