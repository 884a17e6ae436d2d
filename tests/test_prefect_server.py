"""The flows as an MLOps team runs them: a real ``prefect server start`` (SQLite) on a loopback
port, the work pools created, ``prefect deploy --all`` from prefect.yaml, a process worker, runs
started with ``prefect deployment run`` and checked through the API: the pipeline completes with
its artifacts, results persist to SeaweedFS S3 through a saved S3Bucket block, an infeasible
fleet fails once with its message, not retried."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from packing.contracts import ModelSpec
from serving.runtimes.local import free_port
from tests.s3_server import ACCESS_KEY, SECRET_KEY

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TINY_FLEET = {
    "schema_version": 1,
    "name": "tiny",
    "processors": ["cpu"],
    "model_sets": [
        {"prefix": "p-", "count": 2, "digits": 1, "source": "synthetic:bert-tiny",
         "task": "sequence-classification", "max_length": 32, "traffic_rps": 1}
    ],
}  # fmt: skip


class PrefectServer:
    def __init__(self, home: Path, env: dict[str, str]) -> None:
        self.home = home
        self.env = env
        self.api_url = env["PREFECT_API_URL"]

    def cli(self, *args: str, timeout: float = 180, env: dict[str, str] | None = None) -> str:
        done = subprocess.run(
            [str(BIN / "prefect"), "--no-prompt", *args],
            cwd=ROOT,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
        return done.stdout + done.stderr

    def api(self, method: str, path: str, body: dict | None = None) -> object:
        answer = httpx.request(method, f"{self.api_url}{path}", json=body, timeout=30)
        answer.raise_for_status()
        return answer.json()

    def run_deployment(self, name: str, parameters: dict, job_env: dict | None = None) -> str:
        args = ["deployment", "run", name]
        for key, value in parameters.items():
            args += ["-p", f"{key}={json.dumps(value)}"]
        if job_env:
            args += ["--job-variable", f"env={json.dumps(job_env)}"]
        out = self.cli(*args)
        match = re.search(r"UUID: ([0-9a-f-]{36})", out)
        assert match, out
        return match.group(1)

    def wait(self, flow_run_id: str, timeout_s: float = 300) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            run = self.api("GET", f"/flow_runs/{flow_run_id}")
            assert isinstance(run, dict)
            if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                return run
            assert time.monotonic() < deadline, f"flow run still {run['state']['type']}"
            time.sleep(1)

    def task_runs(self, flow_run_id: str) -> list[dict]:
        body = {"flow_runs": {"id": {"any_": [flow_run_id]}}}
        runs = self.api("POST", "/task_runs/filter", body)
        assert isinstance(runs, list)
        return runs

    def artifacts(self, flow_run_id: str) -> list[dict]:
        body = {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}
        found = self.api("POST", "/artifacts/filter", body)
        assert isinstance(found, list)
        return found


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_PREFETCH_SECONDS": "5",
        "PREFECT_LOGGING_LEVEL": "INFO",
        "MYRIAD_HOME": str(home / "myriad"),
        "PWD": str(ROOT),  # what prefect.yaml's set_working_directory step is given
    }
    log = (home / "server.log").open("w")
    server = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    worker = None
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{env['PREFECT_API_URL']}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, (home / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "prefect server did not start"
            time.sleep(1)
        prefect = PrefectServer(home, env)
        prefect.cli("work-pool", "create", "myriad", "--type", "process")
        prefect.cli(
            "work-pool", "create", "myriad-k8s", "--type", "kubernetes",
            "--base-job-template", str(ROOT / "flows/work_pools/kubernetes.json"),
        )  # fmt: skip
        prefect.cli("deploy", "--all", timeout=300)
        worker_log = (home / "worker.log").open("w")
        worker = subprocess.Popen(
            [str(BIN / "prefect"), "worker", "start", "--pool", "myriad", "--limit", "1"],
            cwd=ROOT,
            env=env,
            stdout=worker_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        yield prefect
    finally:
        for process in (worker, server):
            if process is not None:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


@pytest.fixture(scope="module")
def tiny_fleet(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("tiny")
    fleet = root / "tiny.yaml"
    fleet.write_text(yaml.safe_dump(TINY_FLEET))
    return fleet, f"file://{root}/store"


def test_deploy_all_registers_every_deployment_with_its_trigger(
    prefect_server: PrefectServer,
) -> None:
    deployments = prefect_server.api("POST", "/deployments/filter", {})
    assert isinstance(deployments, list)
    names = {d["name"]: d for d in deployments}
    assert {"demo", "trace", "pack", "deploy", "loadtest", "retrain", "k8s-pipeline"} <= set(names)
    assert names["k8s-trace"]["work_pool_name"] == "myriad-k8s"
    assert names["k8s-trace"]["job_variables"]["service_account_name"] == "myriad-orchestrator"
    assert names["demo"]["pull_steps"][0]["prefect.deployments.steps.set_working_directory"] == {
        "directory": str(ROOT)
    }
    automations = prefect_server.api("POST", "/automations/filter", {})
    assert isinstance(automations, list)
    triggers = [a["trigger"] for a in automations]
    assert any("myriad.model.updated" in t.get("expect", []) for t in triggers), triggers


def test_pipeline_deployment_runs_on_the_worker_with_its_artifacts(
    prefect_server: PrefectServer, tiny_fleet: tuple[Path, str]
) -> None:
    fleet, store = tiny_fleet
    run_id = prefect_server.run_deployment(
        "myriad-pipeline/demo",
        {"fleet": str(fleet), "store": store, "duration_s": 1, "concurrency": 2,
         "time_limit_s": 3, "load_modes": ["closed"]},
    )  # fmt: skip
    run = prefect_server.wait(run_id)
    assert run["state"]["type"] == "COMPLETED", run["state"]
    keys = {a["key"] for a in prefect_server.artifacts(run_id)}
    assert {"myriad-plan", "myriad-images"} <= keys
    # The load test is a subflow run; its artifacts hang off it.
    names = {t["name"] for t in prefect_server.task_runs(run_id)}
    assert any(name.startswith("trace-p-0") for name in names), names
    assert "pack-tiny" in names and any(n.startswith("deploy-server-i") for n in names), names


def test_results_persist_to_s3_through_a_saved_s3_bucket_block(
    prefect_server: PrefectServer, tiny_fleet: tuple[Path, str], s3_server, s3_bucket: str
) -> None:
    fleet, store = tiny_fleet
    folder = f"results-{uuid.uuid4().hex[:8]}"
    script = f"""
from prefect_aws import AwsCredentials, S3Bucket
credentials = AwsCredentials(aws_access_key_id={ACCESS_KEY!r},
    aws_secret_access_key={SECRET_KEY!r}, region_name="us-east-1",
    aws_client_parameters={{"endpoint_url": {s3_server.endpoint_url!r}}})
credentials.save("myriad-test", overwrite=True)
S3Bucket(bucket_name={s3_bucket!r}, bucket_folder={folder!r},
    credentials=credentials).save("myriad-results", overwrite=True)
"""
    subprocess.run([sys.executable, "-c", script], env=prefect_server.env, check=True, timeout=120)
    run_id = prefect_server.run_deployment(
        "myriad-trace/trace",
        {"fleet": str(fleet), "store": store, "minimal_profile": True},
        job_env={"MYRIAD_RESULTS": "s3-bucket/myriad-results"},
    )
    run = prefect_server.wait(run_id)
    assert run["state"]["type"] == "COMPLETED", run["state"]
    listed = s3_server.client().list_objects_v2(Bucket=s3_bucket, Prefix=f"{folder}/")
    objects = [o["Key"] for o in listed.get("Contents", [])]
    # The flow's result and each trace chunk's, as JSON records of small values.
    assert len(objects) >= 3 and any("/trace-models-" in key for key in objects), objects
    for key in objects:
        body = s3_server.client().get_object(Bucket=s3_bucket, Key=key)["Body"].read()
        record = json.loads(body)  # JSON through and through: small values, no pickles
        assert len(body) < 20_000, (key, len(body))
        if "/trace-models-" in key:
            assert record["metadata"]["serializer"]["type"] == "json"
            assert json.loads(record["result"])[0]["model_id"].startswith("p-")


def test_an_infeasible_fleet_fails_once_with_its_message(
    prefect_server: PrefectServer, tiny_fleet: tuple[Path, str], tmp_path: Path
) -> None:
    fleet, store = tiny_fleet
    catalog = yaml.safe_load((ROOT / "catalogs/aws.yaml").read_text())
    small = dict(catalog["instance_types"][0])
    small.update(name="c5.nano", device_memory_gib=0.0001, host_memory_gib=0.0001)
    catalog["instance_types"] = [small]
    (tmp_path / "nano.yaml").write_text(yaml.safe_dump(catalog))
    run_id = prefect_server.run_deployment(
        "myriad-pack/pack",
        {"fleet": str(fleet), "catalog": str(tmp_path / "nano.yaml"), "store": store},
    )
    run = prefect_server.wait(run_id)
    assert run["state"]["type"] == "FAILED"
    assert "no plan is possible" in run["state"]["message"], run["state"]["message"]
    assert run["run_count"] == 1
    pack_runs = [t for t in prefect_server.task_runs(run_id) if t["name"] == "pack-tiny"]
    assert len(pack_runs) == 1 and pack_runs[0]["run_count"] == 1
    assert pack_runs[0]["state"]["type"] == "FAILED"


def test_myriad_publish_triggers_the_retrain_deployment(prefect_server: PrefectServer) -> None:
    """The event path: ``myriad publish`` emits myriad.model.updated, the deployment trigger of
    prefect.yaml starts a retrain run with the model's id. No deployment named ``myriad`` runs
    here, so that run fails fast, naming it (the flow itself is tested in test_redeploy_flow)."""
    done = subprocess.run(
        [str(BIN / "myriad"), "publish", "--model", "p-1"],
        cwd=ROOT,
        env=prefect_server.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "emitted myriad.model.updated for p-1" in done.stdout, done
    deployments = prefect_server.api("POST", "/deployments/filter", {})
    assert isinstance(deployments, list)
    retrain = next(d for d in deployments if d["name"] == "retrain")
    deadline = time.monotonic() + 120
    while True:
        runs = prefect_server.api(
            "POST", "/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [retrain["id"]]}}}
        )
        assert isinstance(runs, list)
        if runs:
            break
        assert time.monotonic() < deadline, "the trigger started no retrain run"
        time.sleep(1)
    assert runs[0]["parameters"]["model"] == "p-1"
    run = prefect_server.wait(runs[0]["id"])
    assert run["state"]["type"] == "FAILED"
    assert "no deployment named 'myriad'" in run["state"]["message"], run["state"]["message"]


def test_a_drift_event_starts_a_rebalance_of_its_own_deployment_only(
    prefect_server: PrefectServer,
) -> None:
    """prefect.yaml's rebalance trigger: a myriad.traffic.drifted event of another deployment
    starts nothing; one of deployment ``myriad`` starts a rebalance run of ``myriad`` (which
    fails fast here, where no deployment of that name runs)."""

    def emit(name: str) -> None:
        script = (
            "from prefect.events.worker import EventsWorker\n"
            "from tasks.observe import emit_drift\n"
            f"assert emit_drift.fn({name!r}, {{'models': []}})\n"
            "EventsWorker.drain_all(timeout=30)\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", script],
            cwd=ROOT,
            env=prefect_server.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-2000:]

    deployments = prefect_server.api("POST", "/deployments/filter", {})
    assert isinstance(deployments, list)
    target = next(d for d in deployments if d["name"] == "rebalance")

    def runs() -> list:
        found = prefect_server.api(
            "POST", "/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [target["id"]]}}}
        )
        assert isinstance(found, list)
        return found

    emit("someone-else")
    time.sleep(8)
    assert runs() == []
    emit("myriad")
    deadline = time.monotonic() + 120
    while not runs():
        assert time.monotonic() < deadline, "the drift event started no rebalance run"
        time.sleep(1)
    (run,) = runs()
    assert run["parameters"]["deployment"] == "myriad"
    finished = prefect_server.wait(run["id"])
    assert finished["state"]["type"] == "FAILED"
    assert "no deployment named 'myriad'" in finished["state"]["message"]


def test_an_update_event_redeploys_only_the_retrained_model_with_no_failed_request(
    prefect_server: PrefectServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The retraining loop end to end on the real server: a fleet of three tiny models is
    deployed one server per model; the retrain deployment (prefect.yaml's own entry, trigger and
    all, with parameters naming this test's fleet, store and deployment) runs on the worker when
    ``myriad publish`` announces the retrained model; it re-traces only that model, replaces
    only its server, and the gateway's clients see no failed request throughout."""
    from packing.io import save
    from serving.build.tracing import trace_to_store
    from serving.store import open_store
    from tasks.deploy import deploy, read_deployment, teardown
    from tests.test_deploy import Load, _alive, gateway, make_plan
    from tests.test_redeploy_flow import MINIMAL, MODELS, write_fleet

    store = f"file://{tmp_path}/store"
    for model_id in MODELS:
        spec = ModelSpec(id=model_id, source="synthetic:bert-tiny", max_length=32, traffic_rps=1)
        trace_to_store(spec, "cpu", open_store(store), MINIMAL)
    fleet = write_fleet(tmp_path / "fleet.yaml", {"rb": 3})  # rb is retrained: 3 labels now
    # prefect.yaml's retrain deployment under another name, with this test's parameters.
    project = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    entry = next(d for d in project["deployments"] if d["name"] == "retrain")
    entry.update(name="retrain-event-test", schedules=[])
    entry["parameters"] = {
        "fleet": str(fleet), "catalog": str(ROOT / "catalogs/aws.yaml"), "store": store,
        "deployment": "event", "repack_tolerance": 10.0, "time_limit_s": 3.0,
        "minimal_profile": True, "duration_s": 1.0, "concurrency": 2,
    }  # fmt: skip
    project["deployments"] = [entry]
    (tmp_path / "prefect.yaml").write_text(yaml.safe_dump(project))
    prefect_server.cli("deploy", "--prefect-file", str(tmp_path / "prefect.yaml"), "--all")
    test_deployment = next(
        d
        for d in prefect_server.api("POST", "/deployments/filter", {})  # type: ignore[union-attr]
        if d["name"] == "retrain-event-test"
    )

    monkeypatch.setenv("MYRIAD_HOME", prefect_server.env["MYRIAD_HOME"])  # the worker's records
    plan = make_plan({f"i00{n}-d0": [m] for n, m in enumerate(MODELS)}, "plan-event")
    before = deploy(save(plan, tmp_path / "plan.json"), store, "local", "event")
    try:
        with gateway("event") as url, Load(url, MODELS) as load:
            time.sleep(1)
            published = subprocess.run(
                [str(BIN / "myriad"), "publish", "--model", "rb", "--fleet", str(fleet)],
                cwd=ROOT, env=prefect_server.env, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert published.returncode == 0, published
            deadline = time.monotonic() + 120
            while True:
                body = {"flow_runs": {"deployment_id": {"any_": [test_deployment["id"]]}}}
                runs = prefect_server.api("POST", "/flow_runs/filter", body)
                assert isinstance(runs, list)
                if runs:
                    break
                assert time.monotonic() < deadline, "the update event started no run"
                time.sleep(1)
            run = prefect_server.wait(runs[0]["id"], timeout_s=400)
            time.sleep(1)
        assert run["state"]["type"] == "COMPLETED", run["state"]
        assert run["parameters"]["model"] == "rb"
        assert load.failures == []
        assert load.answers["200"] > 20
        names = {t["name"] for t in prefect_server.task_runs(run["id"])}
        assert "trace-rb-cpu" in names, names
        assert not any(n.startswith(("trace-ra", "trace-rc")) for n in names), names
        after = read_deployment("event", store)
        assert after.plan_id != "plan-event"
        assert {before.handles["i000-d0"], before.handles["i002-d0"]} <= set(after.handles.values())
        assert before.handles["i001-d0"] not in after.handles.values()
        assert not _alive(int(before.handles["i001-d0"]))
    finally:
        teardown("event", store)
