"""Rebalance a running deployment on its observed traffic: the running problem with each
model's observed rate (``packing.traffic``), an incremental repack of the running plan under a
move budget and a cost tolerance, the plan validated; the runtime's redeploy then replaces only
the servers whose models changed. No Prefect: ``myriad rebalance`` and the
``myriad-rebalance`` flow both run :func:`plan_rebalance` and :func:`apply_rebalance`.

Drift (:func:`drift`): a model whose observed rate left its planned band, or a server whose
observed compute passed its planned share, is what starts a rebalance."""

from __future__ import annotations

import msgspec

from packing.contracts import Catalog, Fleet, Plan, Problem
from packing.errors import MyriadError
from packing.io import decode, save
from packing.problems import build_problem
from packing.repack import Move, pack
from packing.traffic import Misplanned, TrafficSettings, misplanned, with_traffic
from serving.build.tracing import stored_profiles
from serving.deployments import Deployment, deployments_dir, read_deployment
from serving.observe import Observation, latest_observation
from serving.runtimes import get_runtime
from serving.runtimes.base import DeployOptions, RedeployResult
from serving.store import open_store, plan_problem_key, publish_plan, read_document


class RebalanceError(MyriadError):
    """The rebalance cannot be made within its budget; the message says what it would take."""


class RebalanceSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    traffic: TrafficSettings = msgspec.field(default_factory=TrafficSettings)
    # A repack within this fraction above a fresh solve keeps models in place; dearer, the
    # fresh solve is taken (and its moves must fit the budget).
    tolerance: float = 0.05
    # At most this many replicas change place (None: no limit).
    max_moves: int | None = None
    time_limit_s: float = 10.0
    # Plan for the observation's high quantile of per-interval rates ("high") or its mean.
    rate: str = "high"

    def __post_init__(self) -> None:
        if self.rate not in ("high", "mean"):
            raise RebalanceError(f"rate {self.rate!r}: choose high or mean")
        if self.tolerance < 0 or (self.max_moves is not None and self.max_moves < 0):
            raise RebalanceError("tolerance and max_moves must be at least 0")


class Rebalance(msgspec.Struct, kw_only=True):
    deployment: str
    plan_before: str
    plan: Plan
    problem: Problem  # with the planned (observed, headroomed) traffic
    moves: list[Move]
    cost_before: float
    cost_after: float
    fresh_cost: float
    changed_servers: list[str]  # server ids of the new plan that a redeploy starts afresh
    busiest: list[Misplanned]  # planned before -> observed, by observed rate
    most_misplanned: list[Misplanned]

    @property
    def unchanged(self) -> bool:
        return not self.moves


def observed_rates(observation: Observation, rate: str = "high") -> dict[str, float]:
    return {
        model: (traffic.rate_high_rps if rate == "high" else traffic.rate_rps)
        for model, traffic in observation.models.items()
    }


def running_problem(
    current: Plan,
    store_uri: str | None,
    fleet: Fleet,
    catalog: Catalog,
    engine: str | None = None,
) -> Problem:
    """The problem the running plan answers: as it was published with the plan (its traffic is
    the planned one), else rebuilt from the fleet's guesses and the stored profiles."""
    store = open_store(store_uri)
    key = plan_problem_key(current.plan_id)
    if store.exists(key):
        return decode(store.get_bytes(key), Problem, store.url_for(key))
    jobs = [
        f"{spec.id}/{proc}" for spec in fleet.all_models() for proc in fleet.processors_for(spec)
    ]
    return build_problem(fleet, stored_profiles(jobs, store_uri), catalog, engine=engine)


def plan_rebalance(
    deployment: Deployment,
    current: Plan,
    problem: Problem,
    observation: Observation,
    settings: RebalanceSettings,
    top: int = 10,
) -> Rebalance:
    """The rebalanced plan for ``observation``; ``problem``: the running plan's problem (its
    profiles, catalog and limits; its traffic is what was planned)."""
    if observation.deployment != deployment.name:
        raise RebalanceError(
            f"the observation is of deployment {observation.deployment!r}, not {deployment.name!r}"
        )
    if observation.plan_id != current.plan_id:
        raise RebalanceError(
            f"the observation was made on plan {observation.plan_id}; {deployment.name} runs "
            f"{current.plan_id} now: observe again"
        )
    observed = observed_rates(observation, settings.rate)
    unknown = sorted(set(observed) - {m.id for m in problem.models})
    if unknown:
        raise RebalanceError(
            f"traffic observed for models the plan's problem does not have: {unknown[:5]}"
        )
    target = with_traffic(problem, observed, settings.traffic, observation.window_s)
    tolerance = settings.tolerance if settings.max_moves is None else float("inf")
    plan, repacked = pack(
        target, current=current, tolerance=tolerance, time_limit_s=settings.time_limit_s
    )
    assert repacked is not None
    if settings.max_moves is not None and len(repacked.moves) > settings.max_moves:
        raise RebalanceError(
            f"the rebalance of {deployment.name} moves {len(repacked.moves)} replicas; the "
            f"budget is {settings.max_moves}: raise --max-moves"
        )
    if (
        settings.max_moves is not None
        and plan.cost_per_hour > repacked.fresh_cost_per_hour * (1 + settings.tolerance) + 1e-9
    ):
        # Within the move budget but dearer than the tolerance allows over a fresh solve.
        raise RebalanceError(
            f"within {settings.max_moves} moves the plan costs ${plan.cost_per_hour:.4f}/h, "
            f"more than {settings.tolerance:.0%} above a fresh solve "
            f"(${repacked.fresh_cost_per_hour:.4f}/h): raise --max-moves or --tolerance"
        )
    kept_sets = {tuple(sorted(s.model_ids)) for s in current.servers}
    changed = sorted(s.id for s in plan.servers if tuple(sorted(s.model_ids)) not in kept_sets)
    rows = misplanned(problem, observed)
    busiest = sorted(rows, key=lambda r: (-r.observed_rps, r.model_id))[:top]
    if not repacked.moves:
        plan = current
    return Rebalance(
        deployment=deployment.name,
        plan_before=current.plan_id,
        plan=plan,
        problem=target,
        moves=repacked.moves,
        cost_before=current.cost_per_hour,
        cost_after=plan.cost_per_hour,
        fresh_cost=repacked.fresh_cost_per_hour,
        changed_servers=changed if repacked.moves else [],
        busiest=busiest,
        most_misplanned=rows[:top],
    )


def rebalance_running(
    name: str,
    store_uri: str | None,
    fleet: Fleet,
    catalog: Catalog,
    settings: RebalanceSettings,
    engine: str | None = None,
) -> tuple[Deployment, Rebalance, str | None]:
    """The rebalance of running deployment ``name`` for its latest observation: (its record,
    the rebalance, the store it uses). What ``myriad rebalance`` and the flow both run."""
    deployment = read_deployment(name, store_uri)
    store_uri = store_uri or deployment.store_uri
    observation = latest_observation(name, store_uri)
    if observation is None:
        raise RebalanceError(
            f"no observation of {name} in the store: run `myriad observe --name {name}` first"
        )
    current = read_document(deployment.plan_uri or deployment.plan_path or "", Plan)
    problem = running_problem(current, store_uri, fleet, catalog, engine)
    return (
        deployment,
        plan_rebalance(deployment, current, problem, observation, settings),
        store_uri,
    )


# ------------------------------------------------------------------------------------- drift


class DriftSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A model drifted when its observed rate is above ``ratio`` times its planned rate or
    below 1/``ratio`` of it (models planned and seen under ``min_rps`` are ignored: noise); a
    server drifted when its observed compute passes ``compute_ratio`` times its planned share
    (and so is overloaded before its planned models are)."""

    ratio: float = 2.0
    min_rps: float = 0.5
    compute_ratio: float = 1.2


class Drift(msgspec.Struct, kw_only=True):
    deployment: str
    plan_id: str
    models: list[Misplanned]  # left their band
    servers: dict[str, float]  # server id -> observed / planned compute

    @property
    def drifted(self) -> bool:
        return bool(self.models or self.servers)


def drift(
    current: Plan, planned: Problem, observation: Observation, settings: DriftSettings
) -> Drift:
    observed = observed_rates(observation, "mean")
    models = [
        row
        for row in misplanned(planned, observed)
        if max(row.planned_rps, row.observed_rps) >= settings.min_rps
        and (row.ratio > settings.ratio or row.ratio < 1 / settings.ratio)
    ]
    by_id = {m.id: m for m in planned.models}
    types = {t.name: t for t in planned.catalog.instance_types}
    instances = {i.id: i for i in current.instances}
    servers: dict[str, float] = {}
    for server in current.servers:
        instance_type = types.get(instances[server.instance].type)
        if instance_type is None or server.compute_utilization <= 0:
            continue
        used = 0.0
        for model_id in server.model_ids:
            model = by_id.get(model_id)
            profile = model.profile_for(instance_type) if model else None
            if model is None or profile is None:
                continue
            replicas = sum(1 for s in current.servers if model_id in s.model_ids)
            used += observed.get(model_id, 0.0) / replicas * profile.seconds_per_request
        ratio = used / instance_type.compute_capacity / server.compute_utilization
        if ratio > settings.compute_ratio:
            servers[server.id] = round(ratio, 3)
    return Drift(
        deployment=observation.deployment, plan_id=current.plan_id, models=models, servers=servers
    )


def apply_rebalance(
    rebalance: Rebalance, deployment: Deployment, options: DeployOptions
) -> RedeployResult | None:
    """Publish the rebalanced plan (with the traffic it was planned for) and move the
    deployment to it through its runtime: only servers whose models changed are replaced,
    each new one ready before an old one stops. None when nothing moves."""
    if rebalance.unchanged:
        return None
    publish_plan(rebalance.plan, options.store_uri, rebalance.problem)
    path = save(
        rebalance.plan, deployments_dir() / f"{deployment.name}.{rebalance.plan.plan_id}.plan.json"
    )
    runtime = get_runtime(deployment.runtime)
    return runtime.redeploy(deployment, rebalance.plan, path, options)
