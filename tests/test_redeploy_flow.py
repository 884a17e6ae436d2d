"""The ``myriad-redeploy`` flow on a deployed fleet of tiny models: one model is retrained (its
source's num_labels changes its content hash); only it is re-traced, only its server replaced,
and every model answers throughout through a gateway with no failed request."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml
from prefect.testing.utilities import prefect_test_harness

from packing.contracts import ModelSpec
from packing.io import save
from serving.build.tracing import TraceSettings, trace_to_store
from serving.store import open_store
from tasks.deploy import deploy, read_deployment, teardown
from tests.test_deploy import Load, _alive, _cmdline_has, gateway, make_plan

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
# What the flow's minimal_profile=True traces with, so unchanged models match their trace key.
MINIMAL = TraceSettings(profile_batch_sizes=(1,), profile_repeats=1)
MODELS = ["ra", "rb", "rc"]


@pytest.fixture(scope="module")
def prefect_server():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def write_fleet(path: Path, labels: dict[str, int]) -> Path:
    models = [
        {"id": m, "source": "synthetic:bert-tiny", "task": "sequence-classification",
         "max_length": 32, "num_labels": labels.get(m, 2), "traffic_rps": 1}
        for m in MODELS
    ]  # fmt: skip
    path.write_text(yaml.safe_dump({"schema_version": 1, "name": "retrain", "processors": ["cpu"],
                                    "models": models}))  # fmt: skip
    return path


def test_redeploy_flow_retraces_and_replaces_only_the_changed_model(
    prefect_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.redeploy import redeploy

    monkeypatch.setenv("MYRIAD_HOME", str(tmp_path / "home"))
    store = f"file://{tmp_path}/store"
    for model_id in MODELS:
        spec = ModelSpec(id=model_id, source="synthetic:bert-tiny", max_length=32, traffic_rps=1)
        trace_to_store(spec, "cpu", open_store(store), MINIMAL)
    # One server per model, so a replaced server and the kept ones can be told apart.
    plan = make_plan({f"i00{n}-d0": [m] for n, m in enumerate(MODELS)}, "plan-retrain")
    before = deploy(save(plan, tmp_path / "plan.json"), store, "local", "retrain")
    fleet = write_fleet(tmp_path / "fleet.yaml", {"rb": 3})  # rb is retrained: 3 labels now
    try:
        with gateway("retrain") as url, Load(url, MODELS) as load:
            time.sleep(1)
            summary = redeploy(
                fleet=str(fleet),
                catalog=str(ROOT / "catalogs/aws.yaml"),
                store=store,
                deployment="retrain",
                repack_tolerance=10.0,  # keep every model where it is (a fresh solve is cheaper)
                time_limit_s=3.0,
                minimal_profile=True,
                duration_s=1.0,
                concurrency=2,
                models=["rb"],
            )
            time.sleep(1)
        assert load.failures == []
        assert load.answers["200"] > 20
        assert summary["changed"] == ["rb/cpu"] and summary["retraced"] == ["rb/cpu"]
        assert summary["moves"] == []
        assert summary["stopped"] == ["i001-d0"]
        assert len(summary["started"]) == 1 and len(summary["kept"]) == 2
        after = read_deployment("retrain")
        assert after.plan_id == summary["plan_id"] != "plan-retrain"
        # The servers of ra and rc are the same processes; rb's old server is gone.
        assert {before.handles["i000-d0"], before.handles["i002-d0"]} <= set(after.handles.values())
        assert before.handles["i001-d0"] not in after.handles.values()
        assert not _alive(int(before.handles["i001-d0"]))
        assert summary["error_rate"] == 0
        assert summary["cost_per_hour"] == summary["cost_per_hour_before"]

        # Run again: nothing changed, nothing is traced or replaced.
        again = redeploy(fleet=str(fleet), catalog=str(ROOT / "catalogs/aws.yaml"), store=store,
                         deployment="retrain", minimal_profile=True, duration_s=0)  # fmt: skip
        assert again["changed"] == [] and read_deployment("retrain").handles == after.handles
    finally:
        teardown("retrain")

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts()
    keys = {a.key for a in artifacts}
    assert {"myriad-redeploy", "myriad-plan", "myriad-trace-progress"} <= keys
    # The solve's progress artifact ends at 100% naming the plan's cost, bound and gap.
    packing = [a for a in artifacts if a.key == "myriad-pack-progress"]
    assert packing and all(a.data == 100.0 for a in packing), [
        (a.data, a.description) for a in packing
    ]
    assert all("gap" in (a.description or "") for a in packing)


def test_deploy_flow_starts_each_server_in_its_own_task_run_and_rolls_back_on_failure(
    prefect_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.stages import deploy as deploy_flow
    from serving.runtimes import DeployError

    monkeypatch.setenv("MYRIAD_HOME", str(tmp_path / "home"))
    store = f"file://{tmp_path}/store"
    for model_id in MODELS[:2]:
        spec = ModelSpec(id=model_id, source="synthetic:bert-tiny", max_length=32, traffic_rps=1)
        trace_to_store(spec, "cpu", open_store(store), MINIMAL)
    good = save(make_plan({"i000-d0": ["ra"], "i001-d0": ["rb"]}, "plan-two"), tmp_path / "g.json")
    state = deploy_flow(plan=str(good), store=store, name="two", return_state=True)
    try:
        assert state.is_completed(), state.message
        record = read_deployment("two")
        assert sorted(record.servers) == ["i000-d0", "i001-d0"]
        with get_client(sync_client=True) as client:
            flow_run_filter = FlowRunFilter(
                id=FlowRunFilterId(any_=[state.state_details.flow_run_id])
            )
            names = {t.name for t in client.read_task_runs(flow_run_filter=flow_run_filter)}
        assert {"deploy-server-i000-d0", "deploy-server-i001-d0"} <= names, names
    finally:
        teardown("two")

    # rc was never traced: its server cannot load, the other one is stopped, nothing recorded.
    bad = save(make_plan({"i000-d0": ["ra"], "i001-d0": ["rc"]}, "plan-bad"), tmp_path / "b.json")
    with pytest.raises(DeployError, match="i001-d0: .*failed to load models: rc"):
        deploy_flow(plan=str(bad), store=store, name="bad")
    with pytest.raises(DeployError, match="no deployment named 'bad'"):
        read_deployment("bad")
    leftovers = [p for p in Path("/proc").glob("[0-9]*") if _cmdline_has(p, str(tmp_path / "home"))]
    assert leftovers == []
