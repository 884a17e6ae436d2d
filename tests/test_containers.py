"""The demo plan in containers: the Docker runtime (through podman) answers as the local runtime
does, teardown removes exactly its containers, and the rendered Kubernetes Deployments run
under ``podman kube play`` with the built image: from a file store, and as on EKS, from an
``s3://`` store (SeaweedFS) read with the credentials of the rendered Secret."""

from __future__ import annotations

import json
import os
import time
import uuid
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import httpx
import pytest
import yaml

from packing.contracts import Catalog, Fleet, Plan
from packing.io import load, save
from packing.problems import build_problem
from packing.solver import solve
from serving.build.tracing import TraceSettings, trace_to_store
from serving.routing.client import Client, Router
from serving.runtimes import DeployOptions, get_runtime
from serving.runtimes.docker import LABEL
from serving.runtimes.local import free_port
from serving.runtimes.manifests import pod_manifests, render
from serving.store import open_store
from tasks.deploy import deploy, deployment_path, teardown
from tasks.trace import trace_jobs
from tests.containers import podman, podman_secret
from tests.s3_server import ACCESS_KEY, SECRET_KEY

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
FAST = TraceSettings(profile_batch_sizes=(1,), profile_repeats=1)
TEXTS = ["a short text", "another, longer text about the weather"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Plan, Path, str]:
    """The demo fleet traced into a file store and packed: (plan, plan file, store URI)."""
    root = tmp_path_factory.mktemp("demo")
    store_uri = f"file://{root}/store"
    fleet = load(ROOT / "examples/demo.yaml", Fleet)
    results = [
        asdict(trace_to_store(spec, processor, open_store(store_uri), FAST, base_dir=ROOT))
        for spec, processor in trace_jobs(fleet)
    ]
    problem = build_problem(fleet, results, load(ROOT / "catalogs/aws.yaml", Catalog))
    plan = solve(problem, time_limit_s=5)
    assert len(plan.servers) >= 2
    return plan, save(plan, root / "plan.json"), store_uri


def answers(plan: Plan, deployment) -> dict[str, list]:
    with Client(Router(plan, deployment)) as client:
        return {m: client.predict(m, TEXTS, raw=True) for m in Router(plan, deployment).model_ids}


def assert_same(left: dict[str, list], right: dict[str, list]) -> None:
    assert left.keys() == right.keys()
    for model_id in left:
        flat_left, flat_right = _floats(left[model_id]), _floats(right[model_id])
        assert len(flat_left) == len(flat_right) > 0, model_id
        assert flat_left == pytest.approx(flat_right, abs=1e-4), model_id


def _floats(value) -> list[float]:
    if isinstance(value, dict):
        return [x for key in sorted(value) for x in _floats(value[key])]
    if isinstance(value, list):
        return [x for item in value for x in _floats(item)]
    return [float(value)] if isinstance(value, int | float) and not isinstance(value, bool) else []


def _containers(label: str) -> list[str]:
    listing = podman("ps", "--all", "--filter", f"label={label}", "--format", "{{.Names}}")
    return listing.stdout.split()


def test_docker_runtime_answers_as_the_local_runtime_and_tears_down_only_its_own(
    demo: tuple[Plan, Path, str],
    cpu_image: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plan, plan_path, store_uri = demo
    monkeypatch.setenv("MYRIAD_HOME", str(tmp_path))
    local = deploy(plan_path, store_uri, "local", "demo-local")
    try:
        expected = answers(plan, local)
    finally:
        teardown("demo-local")

    # A container that is not Myriad's must survive the teardown.
    bystander = f"bystander-{free_port()}"
    # A name of its own: another run on the same podman must not share the label.
    name = f"demo-docker-{free_port()}"
    podman("create", "--name", bystander, "--label", f"{LABEL}=other", cpu_image)
    try:
        containers = deploy(plan_path, store_uri, "docker", name, images={"cpu": cpu_image})
        try:
            assert containers.runtime == "docker"
            made = _containers(f"{LABEL}={name}")
            assert sorted(made) == sorted(containers.handles.values())
            assert len(made) == len(plan.servers)
            assert_same(answers(plan, containers), expected)
            states = get_runtime("docker").status(containers)
            assert {s.state for s in states} == {"ready"}
            inspect = json.loads(podman("inspect", made[0]).stdout)[0]
            assert inspect["HostConfig"]["ReadonlyRootfs"] is True
            assert inspect["HostConfig"]["RestartPolicy"]["Name"] == "on-failure"
            assert inspect["Config"]["User"].startswith("10001")
            # The model cache is writable by the server's user on the read-only root.
            podman("exec", made[0], "touch", "/var/lib/myriad/probe", "/tmp/probe")
        finally:
            stopped = teardown(name)
        assert sorted(stopped) == sorted(s.id for s in plan.servers)
        assert _containers(f"{LABEL}={name}") == []
        assert not deployment_path(name).exists()
        assert _containers(f"{LABEL}=other") == [bystander]
    finally:
        podman("rm", "--force", bystander, check=False)


def upload_store(store_uri: str, client, bucket: str, prefix: str) -> None:
    """Copy a file store's objects under ``s3://bucket/prefix``: the models traced here, as a
    user would sync them to the bucket EKS servers read."""
    root = store_uri.removeprefix("file://")
    for directory, _, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            key = f"{prefix}/{os.path.relpath(path, root)}"
            client.upload_file(path, bucket, key)


@pytest.mark.parametrize("store", ["file", "s3"])
def test_rendered_deployments_run_under_podman_kube_play(
    demo: tuple[Plan, Path, str],
    cpu_image: str,
    tmp_path: Path,
    store: str,
    request: pytest.FixtureRequest,
) -> None:
    """The rendered ConfigMap and Deployments (and for s3, the Secret) under podman kube play;
    every model of every server answers a prediction. The s3 case is the EKS path's last mile:
    the servers read an s3:// store (SeaweedFS on this machine's loopback, so the pods use the
    host's network) with the credentials and endpoint of the Secret rendered from
    store_credentials, nothing mounted."""
    plan, _, file_store = demo
    ports = {server.id: free_port() for server in plan.servers}
    images = {"cpu": cpu_image}
    if store == "file":
        options = DeployOptions(name="kube-play", store_uri=file_store)
        secret = None
    else:
        s3 = request.getfixturevalue("s3_server")
        bucket = request.getfixturevalue("s3_bucket")
        prefix = f"eks-{uuid.uuid4().hex[:8]}"
        upload_store(file_store, s3.client(), bucket, prefix)
        options = DeployOptions(
            name="kube-play",
            store_uri=f"s3://{bucket}/{prefix}",
            store_secret=f"myriad-store-{uuid.uuid4().hex[:8]}",
            store_credentials={
                "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_ENDPOINT_URL": s3.endpoint_url,
                "AWS_REGION": "us-east-1",
            },
        )
        # What a cluster gets: the same render, store checks on.
        (secret,) = [o for o in render(plan, None, options, images) if o["kind"] == "Secret"]
    manifest = tmp_path / "pods.yaml"
    manifest.write_text(
        pod_manifests(
            plan,
            options=options,
            images=images,
            host_ports=ports,
            host_network=store == "s3",
        )
    )
    documents = list(yaml.safe_load_all(manifest.read_text()))
    kinds = [doc["kind"] for doc in documents]
    assert kinds.count("Deployment") == len(plan.servers) and "ConfigMap" in kinds
    if secret is not None:
        for doc in documents:
            if doc["kind"] == "Deployment":
                container = doc["spec"]["template"]["spec"]["containers"][0]
                assert container["envFrom"] == [{"secretRef": {"name": options.store_secret}}]
                env = {e["name"]: e["value"] for e in container["env"]}
                assert env["MYRIAD_STORE"] == options.store_uri
                assert all(m["name"] != "store" for m in container["volumeMounts"])
    with podman_secret(secret) if secret is not None else nullcontext():
        podman("kube", "play", str(manifest), timeout=300)
        try:
            _wait_and_predict(plan, ports)
        finally:
            podman("kube", "down", str(manifest), check=False, timeout=300)


def _wait_and_predict(plan: Plan, ports: dict[str, int]) -> None:
    deadline = time.monotonic() + 300
    pending = dict(ports)
    while pending:
        for server_id, port in list(pending.items()):
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2)
                if ready.status_code == 200:
                    del pending[server_id]
            except httpx.TransportError:
                pass
        if pending:
            assert time.monotonic() < deadline, podman("pod", "ps").stdout
            time.sleep(1)
    for server in plan.servers:
        for model_id in server.model_ids:
            answer = httpx.post(
                f"http://127.0.0.1:{ports[server.id]}/predictions/{model_id}",
                json={"text": TEXTS[0]},
                timeout=60,
            )
            assert answer.status_code == 200, (model_id, answer.text)
