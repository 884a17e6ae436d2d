"""Rebalance on observed traffic: the problem takes the observed rates, the running plan is
repacked under a move budget, drift is flagged, and on real servers a rebalance under load
through the gateway fails no request and replaces only the servers whose models changed."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import msgspec
import pytest

from packing.contracts import Catalog, ModelSpec, Plan, Problem, ProblemModel, Profile
from packing.io import load, save
from packing.solver import solve
from packing.traffic import TrafficError, TrafficSettings, misplanned, with_traffic
from serving.build.tracing import TraceSettings, trace_to_store
from serving.deployments import Deployment
from serving.observe import ModelTraffic, Observation, observe_by_scraping
from serving.rebalance import (
    DriftSettings,
    RebalanceError,
    RebalanceSettings,
    apply_rebalance,
    drift,
    plan_rebalance,
    running_problem,
)
from serving.runtimes import DeployOptions
from serving.store import open_store, publish_plan

ROOT = Path(__file__).resolve().parent.parent
CATALOG = load(ROOT / "catalogs/aws.yaml", Catalog)
MODELS = ("heavy-a", "heavy-b", "light-c", "light-d")
# 40 ms of a device per request: 12 requests/s of one model fill half a c5.large.
SECONDS = 0.04


def guessed_problem(rps: float = 1.0) -> Problem:
    profile = Profile(processor="cpu", memory_bytes=60 << 20, seconds_per_request=SECONDS)
    return Problem(
        name="rebalance",
        catalog=CATALOG,
        models=[ProblemModel(id=m, traffic_rps=rps, profiles=[profile]) for m in MODELS],
    )


def traced_plan(root: Path) -> tuple[str, Problem, Plan]:
    """MODELS traced into a store under ``root``, and the plan for the guessed traffic
    published there with its problem: (store URI, problem, plan)."""
    store = f"file://{root}/store"
    fast = TraceSettings(profile_batch_sizes=(1,), profile_repeats=1)
    for model_id in MODELS:
        spec = ModelSpec(id=model_id, source="synthetic:bert-tiny", max_length=16)
        trace_to_store(spec, "cpu", open_store(store), fast)
    problem = guessed_problem()
    plan = solve(problem, time_limit_s=5)
    publish_plan(plan, store, problem)
    return store, problem, plan


def observation(plan_id: str, rates: dict[str, float], window_s: float = 120.0) -> Observation:
    return Observation(
        deployment="rb",
        plan_id=plan_id,
        source="scrape",
        started_at="2026-12-06T00:00:00+00:00",
        ended_at="2026-12-06T00:02:00+00:00",
        window_s=window_s,
        interval_s=5.0,
        quantile=0.9,
        models={
            m: ModelTraffic(rate_rps=r, rate_high_rps=r, requests=round(r * window_s), errors=0)
            for m, r in rates.items()
        },
        servers={},
    )


def record(plan) -> Deployment:
    return Deployment(
        name="rb",
        plan_id=plan.plan_id,
        runtime="local",
        servers={s.id: f"http://127.0.0.1:{9000 + i}" for i, s in enumerate(plan.servers)},
    )


def test_observed_traffic_with_headroom_and_a_floor() -> None:
    settings = TrafficSettings(floor_rps=0.05, headroom=1.5, min_window_s=60)
    planned = with_traffic(guessed_problem(), {"heavy-a": 10.0}, settings, window_s=90)
    rates = {m.id: m.traffic_rps for m in planned.models}
    assert rates == {"heavy-a": 15.0, "heavy-b": 0.05, "light-c": 0.05, "light-d": 0.05}
    with pytest.raises(TrafficError, match="covers 30 s, less than the 60 s"):
        with_traffic(guessed_problem(), {}, settings, window_s=30)
    with pytest.raises(TrafficError, match="headroom >= 1"):
        TrafficSettings(headroom=0.5)
    rows = misplanned(guessed_problem(), {"heavy-a": 10.0, "light-c": 1.0})
    assert [r.model_id for r in rows[:2]] == ["heavy-b", "light-d"]  # planned 1, seen none
    assert rows[2].model_id == "heavy-a" and rows[2].ratio == 10.0


def test_a_rebalance_separates_the_models_that_got_busy() -> None:
    problem = guessed_problem()
    plan = solve(problem, time_limit_s=5)
    # Planned for 1 request/s each, all four fit one server.
    assert len(plan.servers) == 1
    seen = observation(plan.plan_id, {"heavy-a": 12.0, "heavy-b": 12.0, "light-c": 0.5})
    settings = RebalanceSettings(
        traffic=TrafficSettings(headroom=1.0), tolerance=0.5, time_limit_s=5
    )
    result = plan_rebalance(record(plan), plan, problem, seen, settings)
    homes = {m: [s.id for s in result.plan.servers if m in s.model_ids] for m in MODELS}
    assert homes["heavy-a"] != homes["heavy-b"]
    assert len(result.plan.servers) == 2 and result.moves
    assert result.cost_after > result.cost_before
    assert result.busiest[0].model_id in ("heavy-a", "heavy-b")
    # The problem it planned for is the observed one.
    assert {m.id: m.traffic_rps for m in result.problem.models}["heavy-a"] == 12.0

    with pytest.raises(RebalanceError, match="budget is 0: raise --max-moves"):
        plan_rebalance(
            record(plan), plan, problem, seen, msgspec.structs.replace(settings, max_moves=0)
        )
    stale = msgspec.structs.replace(seen, plan_id="plan-other")
    with pytest.raises(RebalanceError, match="observe again"):
        plan_rebalance(record(plan), plan, problem, stale, settings)
    other = msgspec.structs.replace(seen, deployment="elsewhere")
    with pytest.raises(RebalanceError, match="not 'rb'"):
        plan_rebalance(record(plan), plan, problem, other, settings)


def test_traffic_as_planned_moves_nothing() -> None:
    problem = guessed_problem()
    plan = solve(problem, time_limit_s=5)
    seen = observation(plan.plan_id, dict.fromkeys(MODELS, 1.0))
    settings = RebalanceSettings(traffic=TrafficSettings(headroom=1.0), time_limit_s=5)
    result = plan_rebalance(record(plan), plan, problem, seen, settings)
    assert result.unchanged and result.plan == plan and result.changed_servers == []


def test_drift_names_the_models_and_the_overloaded_server() -> None:
    problem = guessed_problem()
    plan = solve(problem, time_limit_s=5)
    calm = drift(
        plan, problem, observation(plan.plan_id, dict.fromkeys(MODELS, 1.1)), DriftSettings()
    )
    assert not calm.drifted
    busy = drift(
        plan,
        problem,
        observation(plan.plan_id, {"heavy-a": 12.0, "heavy-b": 1.0, "light-c": 1.0}),
        DriftSettings(),
    )
    assert [m.model_id for m in busy.models] == ["light-d", "heavy-a"]
    assert list(busy.servers) == [plan.servers[0].id]
    assert busy.servers[plan.servers[0].id] > 1.2


def test_the_planned_problem_is_kept_with_the_plan(tmp_path: Path) -> None:
    from packing.contracts import Fleet

    store = f"file://{tmp_path}/store"
    problem = guessed_problem(rps=3.0)
    plan = solve(problem, time_limit_s=5)
    fleet = msgspec.convert({"name": "f", "processors": ["cpu"], "models": [
        {"id": m, "source": "synthetic:bert-tiny"} for m in MODELS]}, Fleet)  # fmt: skip
    with pytest.raises(ValueError, match="has no cpu trace"):
        running_problem(plan, store, fleet, CATALOG)  # rebuilt: it needs the traces
    publish_plan(plan, store, problem)
    assert running_problem(plan, store, fleet, CATALOG) == problem


@pytest.mark.slow
def test_a_rebalance_under_load_through_the_gateway_fails_no_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.test_deploy import Load, gateway
    from tests.test_observe import _send

    monkeypatch.setenv("MYRIAD_HOME", str(tmp_path / "home"))
    store, problem, plan = traced_plan(tmp_path)
    assert len(plan.servers) == 1
    from tasks.deploy import deploy, teardown

    deployment = deploy(save(plan, tmp_path / "plan.json"), store, "local", "rb")
    try:
        # Traffic the plan did not expect: heavy-a and heavy-b busy.
        everything = {m: [plan.servers[0].id] for m in MODELS}
        load_thread = threading.Thread(
            target=_send,
            args=(deployment, {"heavy-a": 48, "heavy-b": 48, "light-c": 4}, 3.0, everything),
        )
        threading.Timer(0.3, load_thread.start).start()
        seen = observe_by_scraping(deployment, window_s=6.0, interval_s=1.0)
        load_thread.join()
        assert seen.models["heavy-a"].requests == 48
        settings = RebalanceSettings(
            traffic=TrafficSettings(headroom=1.0, min_window_s=3), tolerance=0.5, time_limit_s=5
        )
        result = plan_rebalance(deployment, plan, problem, seen, settings)
        assert result.moves and len(result.plan.servers) == 2
        kept_handles = set(deployment.handles.values())
        with gateway("rb") as url, Load(url, list(MODELS)) as traffic:
            time.sleep(1.0)
            moved = apply_rebalance(result, deployment, DeployOptions(name="rb", store_uri=store))
            time.sleep(1.5)
        assert traffic.failures == []
        assert sum(traffic.answers.values()) > 20
        # Only servers whose model sets changed were started; an unchanged one was kept.
        assert moved is not None and moved.started == result.changed_servers
        assert len(moved.kept) + len(moved.started) == len(result.plan.servers)
        assert set(moved.deployment.handles.values()) - kept_handles
    finally:
        teardown("rb")
