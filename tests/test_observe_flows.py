"""The observe and rebalance flows on a temporary Prefect server over real servers: traffic the
plan did not expect is observed as drift (an event for this deployment), a dry run changes
nothing, and the rebalance moves the busy models apart, replacing only changed servers."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import yaml
from prefect.testing.utilities import prefect_test_harness

from packing.io import save
from serving.store import open_store
from tasks.deploy import deploy, read_deployment, teardown
from tests.test_observe import _send
from tests.test_rebalance import MODELS, traced_plan

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_server():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_observe_finds_drift_and_rebalance_follows_it(
    prefect_server: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.observe import observe, rebalance

    monkeypatch.setenv("MYRIAD_HOME", str(tmp_path / "home"))
    store, _, plan = traced_plan(tmp_path)
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(
        yaml.safe_dump(
            {
                "name": "rebalance",
                "processors": ["cpu"],
                "models": [{"id": m, "source": "synthetic:bert-tiny"} for m in MODELS],
            }
        )
    )
    deployment = deploy(save(plan, tmp_path / "plan.json"), store, "local", "flowed")
    try:
        one_server = {m: [plan.servers[0].id] for m in MODELS}
        load = threading.Thread(
            target=_send,
            args=(deployment, {"heavy-a": 240, "heavy-b": 240, "light-c": 10}, 20.0, one_server),
        )
        load.start()
        found = observe(
            deployment="flowed", fleet=str(fleet), store=store, window_s=6, interval_s=1
        )
        load.join()
        assert found["drifted"] and found["event_id"]
        assert {"heavy-a", "heavy-b"} <= set(found["drifted_models"])
        assert list(found["overloaded_servers"]) == [plan.servers[0].id]

        common = {
            "deployment": "flowed",
            "fleet": str(fleet),
            "store": store,
            "min_window_s": 3,
            "headroom": 1.0,
            "tolerance": 0.5,
            "time_limit_s": 5,
        }
        dry = rebalance(**common, dry_run=True)
        assert dry["moves"] and dry["started"] == []
        assert read_deployment("flowed").plan_id == plan.plan_id
        done = rebalance(**common, duration_s=1)
        assert done["moves"] and done["started"] == done["changed_servers"]
        assert done["error_rate"] == 0
        moved = read_deployment("flowed")
        assert moved.plan_id == done["plan_id"] != plan.plan_id
        homes = {m: [s for s, ms in _servers(store, moved.plan_id).items() if m in ms]
                 for m in ("heavy-a", "heavy-b")}  # fmt: skip
        assert homes["heavy-a"] != homes["heavy-b"]
    finally:
        teardown("flowed")


def _servers(store: str, plan_id: str) -> dict[str, list[str]]:
    from serving.store import plan_key
    from tasks.documents import open_plan

    plan = open_plan(open_store(store).url_for(plan_key(plan_id)))
    return {s.id: s.model_ids for s in plan.servers}
