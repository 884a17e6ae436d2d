"""The local runtime: real supervised server processes from a plan, routing with failover,
redeploys that replace only what changed, and restarts, with no failed request through the
gateway."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from packing.contracts import ModelSpec, Plan, PlannedInstance, PlannedServer
from packing.io import save
from serving.build.tracing import TraceSettings, trace_to_store
from serving.routing.client import Client, Router, RoutingError
from serving.runtimes import get_runtime
from serving.runtimes.local import free_port
from serving.store import open_store
from tasks.deploy import DeployError, deploy, deployment_path, read_deployment, redeploy, teardown
from tasks.documents import read_document

pytestmark = pytest.mark.slow

FAST = TraceSettings(profile_batch_sizes=(1,), profile_repeats=1)


def make_plan(servers: dict[str, list[str]], plan_id: str = "plan-test") -> Plan:
    """A plan with one c5.large per server; ``servers`` maps a server id to its model ids."""
    instances = {
        server_id: PlannedInstance(
            id=server_id.removesuffix("-d0"), type="c5.large", processor="cpu", price_per_hour=0.085
        )
        for server_id in servers
    }
    return Plan(
        plan_id=plan_id,
        created_at="2026-11-24T00:00:00Z",
        problem="test",
        instances=list(instances.values()),
        servers=[
            PlannedServer(
                id=server_id,
                instance=instances[server_id].id,
                device=0,
                processor="cpu",
                model_ids=models,
                memory_bytes=0,
                memory_capacity_bytes=4 << 30,
                compute_utilization=0.0,
            )
            for server_id, models in servers.items()
        ],
        cost_per_hour=0.085 * len(servers),
        lower_bound_cost_per_hour=0.0,
        gap=1.0,
        solver_status="test",
        solve_seconds=0.0,
    )


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    uri = f"file://{tmp_path_factory.mktemp('deploy')}/store"
    for name in ("shared", "only-a", "only-b", "new-c"):
        trace_to_store(
            ModelSpec(id=name, source="synthetic:bert-tiny", max_length=32),
            "cpu",
            open_store(uri),
            FAST,
        )
    return uri


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _server_pid(supervisor_pid: int) -> int:
    """The model server that a supervisor runs (its one child)."""
    children = Path(f"/proc/{supervisor_pid}/task/{supervisor_pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


@contextmanager
def gateway(name: str) -> Iterator[str]:
    """A real gateway process for deployment ``name``, following its record."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "serving.routing.gateway",
         "--deployment", str(deployment_path(name)), "--port", str(port)],
        env={**os.environ, "MYRIAD_LOG_LEVEL": "warning"},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/v2/health/live", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, "gateway did not start"
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=20)


class Load:
    """Closed-loop clients through the gateway, counting every answer by status."""

    def __init__(self, url: str, model_ids: list[str], clients: int = 4) -> None:
        self.url = url
        self.model_ids = model_ids
        self.answers: Counter[str] = Counter()
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(n,)) for n in range(clients)]

    def _loop(self, n: int) -> None:
        with httpx.Client(timeout=30) as http:
            i = n
            while not self._stop.is_set():
                model_id = self.model_ids[i % len(self.model_ids)]
                i += 1
                try:
                    answer = http.post(f"{self.url}/predictions/{model_id}", json={"text": "hi"})
                    self.answers[str(answer.status_code)] += 1
                    if answer.status_code != 200:
                        self.failures.append(f"{model_id}: {answer.status_code} {answer.text}")
                except httpx.HTTPError as exc:
                    self.answers["error"] += 1
                    self.failures.append(f"{model_id}: {exc!r}")

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()


def test_deploy_route_failover_and_teardown(
    store_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MYRIAD_HOME", str(tmp_path))
    plan = make_plan({"i000-d0": ["only-a", "shared"], "i001-d0": ["shared"]})
    plan_path = save(plan, tmp_path / "plan.json")
    deployment = deploy(plan_path, store_uri, "local", "t")
    supervisors = [int(pid) for pid in deployment.handles.values()]
    try:
        assert read_deployment("t") == deployment
        assert len(deployment.servers) == 2
        router = Router(plan, deployment)
        assert len(router.urls_for("shared")) == 2
        with Client(router) as client:
            assert client.predict("only-a", "hello")["label"].startswith("LABEL_")
            # Kill one replica of "shared", supervisor and all: the client fails over.
            os.killpg(int(deployment.handles["i001-d0"]), signal.SIGKILL)
            for _ in range(5):
                assert client.predict("shared", ["x", "y"])[1]["label"].startswith("LABEL_")
            with pytest.raises(RoutingError, match="'nope' is not in plan plan-test"):
                client.predict("nope", "x")
        states = {s.server_id: s.state for s in get_runtime("local").status(deployment)}
        assert states == {"i000-d0": "ready", "i001-d0": "down"}
    finally:
        stopped = teardown("t")
    assert stopped == ["i000-d0", "i001-d0"]
    assert not deployment_path("t").exists()
    assert not open_store(store_uri).list("deployments/t")
    assert not any(_alive(pid) for pid in supervisors)


def test_a_server_that_cannot_load_fails_the_deploy_and_leaves_nothing(
    store_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MYRIAD_HOME", str(tmp_path))
    plan_path = save(make_plan({"i000-d0": ["shared", "never-traced"]}), tmp_path / "plan.json")
    with pytest.raises(DeployError, match="failed to load models: never-traced"):
        deploy(plan_path, store_uri, "local", "bad")
    assert not deployment_path("bad").exists()
    assert not [p for p in Path("/proc").glob("[0-9]*") if _cmdline_has(p, str(tmp_path))]


def _cmdline_has(proc: Path, text: str) -> bool:
    try:
        return text.encode() in (proc / "cmdline").read_bytes()
    except OSError:
        return False


def test_redeploy_replaces_only_changed_servers_with_no_failed_request(
    store_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MYRIAD_HOME", str(tmp_path))
    before = make_plan(
        {"i000-d0": ["only-a", "shared"], "i001-d0": ["only-b", "shared"]}, "plan-before"
    )
    # The new plan renumbers the unchanged server and gives the other one a new model.
    after = make_plan(
        {"i007-d0": ["only-a", "shared"], "i008-d0": ["new-c", "only-b", "shared"]}, "plan-after"
    )
    deployed = deploy(save(before, tmp_path / "before.json"), store_uri, "local", "r")
    try:
        with gateway("r") as url, Load(url, ["only-a", "only-b", "shared"]) as load:
            time.sleep(2)
            result = redeploy(save(after, tmp_path / "after.json"), store_uri, "r")
            time.sleep(2)
            answer = httpx.post(f"{url}/predictions/new-c", json={"text": "hi"}, timeout=30)
            assert answer.status_code == 200, answer.text
        assert load.failures == []
        assert load.answers["200"] > 20
        assert result.kept == ["i007-d0"] and result.started == ["i008-d0"]
        assert result.stopped == ["i001-d0"]
        moved = read_deployment("r")
        assert moved.plan_id == "plan-after"
        assert moved.handles["i007-d0"] == deployed.handles["i000-d0"]  # the same process
        assert _alive(int(deployed.handles["i000-d0"]))
        assert not _alive(int(deployed.handles["i001-d0"]))
    finally:
        teardown("r")


def test_the_record_in_the_store_lets_another_machine_redeploy_and_tear_down(
    store_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retrain job on a Kubernetes work pool has none of the deploying machine's files: it
    finds the running deployment, and the plan it runs, through the store."""
    monkeypatch.setenv("MYRIAD_HOME", str(tmp_path / "deployer"))
    before = make_plan({"i000-d0": ["only-a"], "i001-d0": ["only-b"]}, "plan-one")
    deployed = deploy(save(before, tmp_path / "one.json"), store_uri, "local", "s")
    try:
        in_store = read_deployment("s", store_uri)
        assert in_store == deployed and in_store.store_uri == store_uri
        store = open_store(store_uri)
        assert in_store.plan_uri == store.url_for("deployments/s/plan-one.plan.json")
        assert read_document(in_store.plan_uri, Plan) == before
        monkeypatch.setenv("MYRIAD_HOME", str(tmp_path / "elsewhere"))
        with pytest.raises(DeployError, match="no deployment named 's'"):
            read_deployment("s")
        after = make_plan({"i000-d0": ["only-a"], "i001-d0": ["only-b", "shared"]}, "plan-two")
        result = redeploy(save(after, tmp_path / "two.json"), store_uri, "s")
        assert result.kept == ["i000-d0"] and result.started == ["i001-d0"]
        assert read_deployment("s", store_uri).plan_id == "plan-two"
        assert _alive(int(deployed.handles["i000-d0"]))
    finally:
        stopped = teardown("s", store_uri)
    assert stopped == ["i000-d0", "i001-d0"]
    assert not open_store(store_uri).list("deployments/s")
    assert not any(_alive(int(pid)) for pid in deployed.handles.values())


def test_a_killed_server_is_restarted_and_no_request_fails_meanwhile(
    store_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MYRIAD_HOME", str(tmp_path))
    plan = make_plan({"i000-d0": ["only-a", "shared"], "i001-d0": ["only-b", "shared"]})
    deployment = deploy(save(plan, tmp_path / "plan.json"), store_uri, "local", "k")
    runtime = get_runtime("local")
    try:
        victim = _server_pid(int(deployment.handles["i001-d0"]))
        with gateway("k") as url, Load(url, ["shared"]) as load:
            time.sleep(2)
            os.kill(victim, signal.SIGKILL)
            deadline = time.monotonic() + 120
            while {s.state for s in runtime.status(deployment)} != {"ready"}:
                assert time.monotonic() < deadline, runtime.status(deployment)
                time.sleep(0.5)
            time.sleep(1)
        assert load.failures == []
        assert load.answers["200"] > 20
        assert not _alive(victim)
        assert _server_pid(int(deployment.handles["i001-d0"])) != victim
    finally:
        teardown("k")


def test_unknown_runtime_and_missing_deployment_say_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MYRIAD_HOME", str(tmp_path))
    plan_path = save(make_plan({"i000-d0": ["shared"]}), tmp_path / "plan.json")
    with pytest.raises(DeployError, match="unknown runtime 'k8s'"):
        deploy(plan_path, None, "k8s", "x")
    with pytest.raises(DeployError, match="no deployment named 'ghost'"):
        teardown("ghost")
