"""The Kubernetes runtime's manifests against the Kubernetes schemas, its routing and redeploy
rules, the eksctl config, and (with MYRIAD_TEST_KUBECONFIG) a real apply on a cluster.

The committed examples under infra/k8s are regenerated here; MYRIAD_REGENERATE=1 rewrites them.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from packing.contracts import Catalog, Plan, PlannedInstance, PlannedServer
from packing.io import load, to_json
from serving.runtimes import eks
from serving.runtimes.base import DeployError, DeployOptions
from serving.runtimes.kubernetes import KubernetesRuntime, pod_reason, rolled_out
from serving.runtimes.manifests import (
    FINGERPRINT_ANNOTATION,
    manifest_files,
    model_label,
    pod_manifests,
    render,
    write_manifests,
)

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra" / "k8s"
CATALOG = load(ROOT / "catalogs" / "aws.yaml", Catalog)
K8S_VERSION = "1.30"
IMAGES = {
    p: f"123456789012.dkr.ecr.us-east-1.amazonaws.com/myriad/server-{p}:0.1.0"
    for p in ("cpu", "gpu", "inf")
}
REGENERATE = os.environ.get("MYRIAD_REGENERATE") == "1"


def example_plan(plan_id: str = "example", bert_on_gpu: int = 4) -> Plan:
    """cpu, gpu and inf servers; minilm replicated on both cpu servers; a model id with a dot."""
    instances = [
        PlannedInstance(id="i000-c5-large", type="c5.large", processor="cpu", price_per_hour=0.085),
        PlannedInstance(id="i001-c5-large", type="c5.large", processor="cpu", price_per_hour=0.085),
        PlannedInstance(
            id="i002-g4dn-xlarge", type="g4dn.xlarge", processor="gpu", price_per_hour=0.526
        ),
        PlannedInstance(
            id="i003-g4dn-12xlarge", type="g4dn.12xlarge", processor="gpu", price_per_hour=3.912
        ),
        PlannedInstance(
            id="i004-inf2-xlarge", type="inf2.xlarge", processor="inf", price_per_hour=0.7582
        ),
    ]
    layout = {
        ("i000-c5-large", 0): ["minilm", "distil.v2"],
        ("i001-c5-large", 0): ["minilm"],
        ("i002-g4dn-xlarge", 0): [f"bert-{i:04d}" for i in range(bert_on_gpu)],
        ("i003-g4dn-12xlarge", 0): ["bert-1000", "bert-1001"],
        ("i003-g4dn-12xlarge", 1): ["bert-1002"],
        ("i004-inf2-xlarge", 0): ["bert-2000", "bert-2001"],
    }
    processors = {i.id: i.processor for i in instances}
    servers = [
        PlannedServer(
            id=f"{instance}-d{device}",
            instance=instance,
            device=device,
            processor=processors[instance],
            model_ids=models,
            memory_bytes=len(models) * (450 << 20),
            memory_capacity_bytes=CATALOG.get(
                next(i.type for i in instances if i.id == instance)
            ).device_memory_bytes,
            compute_utilization=0.1 * len(models),
        )
        for (instance, device), models in layout.items()
    ]
    return Plan(
        plan_id=plan_id,
        created_at="2026-11-24T00:00:00Z",
        problem="example",
        instances=instances,
        servers=servers,
        cost_per_hour=sum(i.price_per_hour for i in instances),
        lower_bound_cost_per_hour=0.0,
        gap=1.0,
        solver_status="example",
        solve_seconds=0.0,
    )


@pytest.fixture
def options(tmp_path: Path) -> DeployOptions:
    # An empty file store: fingerprints then hash processor, engine and model ids only.
    return DeployOptions(name="example", store_uri=f"file://{tmp_path}/store", images=IMAGES)


def _by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def _models_of(deployment: dict, plan: Plan) -> list[str]:
    """The models a rendered Deployment serves, read from its container args and the plan in the
    ConfigMap, as the server would."""
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    server_id = args[args.index("--server") + 1]
    return plan.server(server_id).model_ids


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_every_manifest_validates_against_the_kubernetes_schemas(options: DeployOptions) -> None:
    objects = render(
        example_plan(), CATALOG, options, IMAGES, hpa=True, role_arn="arn:aws:iam::1:role/r"
    )
    kinds = {o["kind"] for o in objects}
    assert kinds == {
        "Namespace",
        "ServiceAccount",
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "Ingress",
    }
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        for key, value in obj["metadata"].get("labels", {}).items():
            assert len(value) <= 63 and len(key.split("/")[-1]) <= 63, (key, value)
        assert len(obj["metadata"]["name"]) <= 63


def test_servers_pinned_sized_and_locked_down(options: DeployOptions) -> None:
    plan = example_plan()
    objects = render(plan, CATALOG, options, IMAGES)
    deployments = {d["metadata"]["name"]: d for d in _by_kind(objects, "Deployment")}
    assert sorted(deployments) == sorted(s.id for s in plan.servers)
    types = {i.id: i.type for i in plan.instances}
    for server in plan.servers:
        d = deployments[server.id]
        assert d["spec"]["replicas"] == 1
        assert d["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
        pod = d["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert container["image"] == IMAGES[server.processor]
        assert container["args"][:4] == ["--plan", "/etc/myriad/plan.json", "--server", server.id]
        assert pod["nodeSelector"] == {"node.kubernetes.io/instance-type": types[server.instance]}
        limits = container["resources"]["limits"]
        assert container["resources"]["requests"] == limits
        tolerated = {t["key"]: t for t in pod["tolerations"]}
        assert tolerated["myriad.io/processor"]["value"] == server.processor
        if server.processor == "gpu":
            assert limits["nvidia.com/gpu"] == 1 and "aws.amazon.com/neuron" not in limits
            assert "nvidia.com/gpu" in tolerated and "aws.amazon.com/neuron" not in tolerated
        elif server.processor == "inf":
            assert limits["aws.amazon.com/neuron"] == 1 and "nvidia.com/gpu" not in limits
            assert "aws.amazon.com/neuron" in tolerated and "nvidia.com/gpu" not in tolerated
        else:
            assert not {"nvidia.com/gpu", "aws.amazon.com/neuron"} & set(limits)
            assert set(tolerated) == {"myriad.io/processor"}
        # The share of the instance leaves the kubelet room: less than vCPUs / devices.
        instance_type = CATALOG.get(types[server.instance])
        cpu_m = int(limits["cpu"].rstrip("m"))
        assert 0 < cpu_m < instance_type.vcpus * 1000 / instance_type.devices
        memory_mib = int(limits["memory"].rstrip("Mi"))
        assert 0 < memory_mib < instance_type.host_memory_gib * 1024 / instance_type.devices
        security = container["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] == 10001
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}
        startup = container["startupProbe"]
        assert startup["httpGet"]["path"] == "/v2/health/ready"
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
        assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
        assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert mounts["/etc/myriad"]["readOnly"] is True
        assert {"/var/lib/myriad", "/tmp"} <= set(mounts)
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["MYRIAD_STORE"] == options.store_uri
        assert env["MYRIAD_HOME"] == "/var/lib/myriad"
        assert d["metadata"]["annotations"][FINGERPRINT_ANNOTATION].startswith("sha256:")
    # 4 devices on a g4dn.12xlarge: a quarter each.
    big = deployments["i003-g4dn-12xlarge-d0"]["spec"]["template"]["spec"]["containers"][0]
    assert big["resources"]["limits"]["cpu"] == f"{(48000 - 250 - 960) // 4 // 10 * 10}m"
    (configmap,) = _by_kind(objects, "ConfigMap")
    assert Plan.__name__ and json.loads(configmap["data"]["plan.json"]) == json.loads(to_json(plan))
    account = _by_kind(objects, "ServiceAccount")[0]
    assert "annotations" not in account["metadata"]
    with_role = render(plan, CATALOG, options, IMAGES, role_arn="arn:aws:iam::1:role/r")
    assert _by_kind(with_role, "ServiceAccount")[0]["metadata"]["annotations"] == {
        "eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/r"
    }


def test_every_model_is_routed_to_a_service_whose_pods_serve_it(options: DeployOptions) -> None:
    plan = example_plan()
    objects = render(plan, CATALOG, options, IMAGES)
    services = {s["metadata"]["name"]: s for s in _by_kind(objects, "Service")}
    pods = [
        (d["spec"]["template"]["metadata"]["labels"], _models_of(d, plan))
        for d in _by_kind(objects, "Deployment")
    ]
    routes: dict[str, set[str]] = {}
    for ingress in _by_kind(objects, "Ingress"):
        assert ingress["spec"]["ingressClassName"] == "nginx"
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                match = re.fullmatch(r"/(predictions|v2/models)/(.+)", path["path"])
                assert match, path
                model_id = match.group(2)
                routes.setdefault(model_id, set()).add(match.group(1))
                if "." in model_id:
                    assert path["pathType"] == "ImplementationSpecific"
                else:
                    assert path["pathType"] == "Prefix"
                service = services[path["backend"]["service"]["name"]]
                selected = [
                    models
                    for labels, models in pods
                    if _matches(service["spec"]["selector"], labels)
                ]
                assert selected, f"{model_id}: Service {service['metadata']['name']} selects no pod"
                assert all(model_id in models for models in selected), model_id
                holders = len(plan.servers_for(model_id))
                assert len(selected) == holders, model_id
    assert routes == {m: {"predictions", "v2/models"} for m in plan.model_ids()}
    # minilm is on two servers: its own Service, selecting both by the model label.
    minilm = [
        s
        for s in services.values()
        if s["metadata"].get("annotations", {}).get("myriad.io/model") == "minilm"
    ]
    assert len(minilm) == 1 and minilm[0]["spec"]["selector"][model_label("minilm")] == "true"


def test_thousands_of_models_split_over_ingress_shards(options: DeployOptions) -> None:
    plan = example_plan(bert_on_gpu=3000)
    objects = render(plan, CATALOG, options, IMAGES)
    shards = _by_kind(objects, "Ingress")
    assert len(shards) == 16  # 2 x 3,009 paths / 500 = 13 shards, rounded up to a power of two
    counts = [len(s["spec"]["rules"][0]["http"]["paths"]) for s in shards]
    assert sum(counts) == 2 * len(plan.model_ids())
    for shard in shards:
        assert len(yaml.safe_dump(shard)) < 200_000
    assert max(counts) < 2 * 500


def test_kustomization_lists_every_file_and_write_is_atomic(
    options: DeployOptions, tmp_path: Path
) -> None:
    plan = example_plan()
    out = tmp_path / "k8s" / plan.plan_id
    written = write_manifests(plan, out, CATALOG, options, IMAGES)
    kustomization = yaml.safe_load((out / "kustomization.yaml").read_text())
    on_disk = sorted(str(p.relative_to(out)) for p in out.rglob("*.yaml"))
    assert sorted(kustomization["resources"] + ["kustomization.yaml"]) == on_disk
    assert sorted(str(p.relative_to(out)) for p in written) == on_disk
    assert not any("&id" in p.read_text() for p in written)  # no YAML anchors or aliases
    documents = [
        d for f in kustomization["resources"] for d in yaml.safe_load_all((out / f).read_text())
    ]
    assert len(documents) == len(render(plan, CATALOG, options, IMAGES))
    # A failed render leaves the old folder as it was, and no temp folder beside it.
    before = {p: p.read_bytes() for p in out.rglob("*.yaml")}
    with pytest.raises(DeployError, match="no fingerprint"):
        write_manifests(plan, out, CATALOG, options, IMAGES, fingerprints={})
    assert {p: p.read_bytes() for p in out.rglob("*.yaml")} == before
    assert sorted(p.name for p in out.parent.iterdir()) == [plan.plan_id]


def test_kept_servers_render_byte_identical_across_plans(options: DeployOptions) -> None:
    old = example_plan("plan-a")
    new = example_plan("plan-b", bert_on_gpu=5)  # one gpu server gains a model
    old_files = manifest_files(render(old, CATALOG, options, IMAGES))
    new_files = manifest_files(render(new, CATALOG, options, IMAGES))
    changed = {"servers/i002-g4dn-xlarge-d0.yaml"}
    servers = {f for f in old_files if f.startswith("servers/")}
    assert servers == {f for f in new_files if f.startswith("servers/")}
    for file in servers - changed:
        assert old_files[file] == new_files[file], file
    for file in changed:
        assert old_files[file] != new_files[file]
    assert old_files["plan.yaml"] != new_files["plan.yaml"]  # the plan in the ConfigMap


def test_pod_manifests_for_podman_kube_play(options: DeployOptions) -> None:
    plan = example_plan()
    text = pod_manifests(
        plan,
        ["i000-c5-large-d0"],
        catalog=CATALOG,
        options=options,
        host_ports={"i000-c5-large-d0": 18080},
    )
    documents = list(yaml.safe_load_all(text))
    assert [d["kind"] for d in documents] == ["ConfigMap", "Deployment"]
    deployment = documents[1]
    assert "namespace" not in deployment["metadata"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["ports"][0]["hostPort"] == 18080
    store = options.store_uri.removeprefix("file://")
    assert {"name": "store", "mountPath": store, "readOnly": True} in container["volumeMounts"]
    for document in documents:
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)
    with pytest.raises(DeployError, match="no servers"):
        pod_manifests(plan, ["nope"], options=options)


def test_rollout_and_pod_reasons() -> None:
    deployment = {
        "metadata": {"generation": 2},
        "spec": {"replicas": 1},
        "status": {
            "observedGeneration": 2,
            "updatedReplicas": 1,
            "availableReplicas": 1,
            "replicas": 2,
        },
    }
    assert not rolled_out(deployment)  # the old pod is still there
    deployment["status"]["replicas"] = 1
    assert rolled_out(deployment)
    deployment["metadata"]["generation"] = 3
    assert not rolled_out(deployment)
    pending = {
        "metadata": {"name": "p"},
        "status": {
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": "0/3 nodes",
                }
            ]
        },
    }
    assert pod_reason(pending) == "p Unschedulable: 0/3 nodes"
    crashing = {
        "metadata": {"name": "c"},
        "status": {
            "containerStatuses": [
                {
                    "ready": False,
                    "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off"}},
                    "lastState": {"terminated": {"exitCode": 1, "reason": "Error"}},
                }
            ]
        },
    }
    assert pod_reason(crashing) == "c CrashLoopBackOff: back-off (last exit 1: Error)"


def test_no_kubeconfig_names_what_was_tried(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(DeployError, match=r"tried \$KUBECONFIG .*missing.*in-cluster"):
        KubernetesRuntime().api_client()
    with pytest.raises(DeployError, match="does not exist"):
        KubernetesRuntime(kubeconfig=tmp_path / "nope").api_client()


def test_eks_cluster_config_one_node_group_per_family() -> None:
    plan = example_plan()
    config = eks.cluster_config(plan, CATALOG, "myriad", "us-east-1", namespace="myriad-example")
    assert config["apiVersion"] == "eksctl.io/v1alpha5" and config["iam"]["withOIDC"] is True
    groups = {g["name"]: g for g in config["managedNodeGroups"] if g["name"] != "system"}
    assert sorted(groups) == ["servers-c5", "servers-g4dn", "servers-inf2"]
    assert groups["servers-g4dn"]["instanceTypes"] == ["g4dn.12xlarge", "g4dn.xlarge"]
    assert groups["servers-c5"]["desiredCapacity"] == groups["servers-c5"]["minSize"] == 2
    assert groups["servers-g4dn"]["desiredCapacity"] == 2
    assert groups["servers-inf2"]["desiredCapacity"] == 1
    for group in groups.values():
        assert group["maxSize"] > group["desiredCapacity"]
    # Node groups carry the taints and labels the rendered servers tolerate and select.
    objects = render(
        plan,
        CATALOG,
        DeployOptions(name="example", store_uri=None),
        IMAGES,
        fingerprints={s.id: "sha256:0" for s in plan.servers},
    )
    for d in _by_kind(objects, "Deployment"):
        pod = d["spec"]["template"]["spec"]
        instance_type = CATALOG.get(pod["nodeSelector"]["node.kubernetes.io/instance-type"])
        group = groups[f"servers-{instance_type.family}"]
        assert instance_type.name in group["instanceTypes"]
        for taint in group["taints"]:
            assert any(
                t["key"] == taint["key"]
                and t.get("value") in (None, taint["value"])
                and t["effect"] == taint["effect"]
                for t in pod["tolerations"]
            )
    accounts = {a["metadata"]["name"] for a in config["iam"]["serviceAccounts"]}
    assert {"cluster-autoscaler", "aws-load-balancer-controller", "myriad-server"} <= accounts


def _committed() -> dict[Path, str]:
    plan = example_plan()
    options = DeployOptions(name="example", images=IMAGES)
    # Fingerprints of an empty store, fixed so the example does not depend on the machine.
    prints = {s.id: f"sha256:{'0' * 63}{i}" for i, s in enumerate(plan.servers)}
    files = {INFRA / "example-plan.json": to_json(plan).decode()}
    config = eks.cluster_config(plan, CATALOG, "myriad", "us-east-1", namespace="myriad-example")
    files[INFRA / "eks-cluster.yaml"] = eks.to_yaml(config, plan)
    files[INFRA / "addons.sh"] = eks.addons_script("myriad", "us-east-1")
    objects = render(plan, CATALOG, options, IMAGES, fingerprints=prints)
    for name, text in manifest_files(objects).items():
        files[INFRA / plan.plan_id / name] = text
    return files


def test_committed_examples_are_in_step() -> None:
    files = _committed()
    if REGENERATE:
        for path, text in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    for path, text in files.items():
        assert path.is_file(), f"{path} missing: MYRIAD_REGENERATE=1 pytest {__file__}"
        assert path.read_text() == text, f"{path} is stale: MYRIAD_REGENERATE=1 pytest {__file__}"
    listed = {
        p for p in files if p.parent == INFRA / "example" or p.parent.parent == INFRA / "example"
    }
    assert set((INFRA / "example").rglob("*.yaml")) == listed


@pytest.mark.skipif(
    not os.environ.get("MYRIAD_TEST_KUBECONFIG"),
    reason="no Kubernetes cluster here: set MYRIAD_TEST_KUBECONFIG to apply for real",
)
def test_apply_wait_redeploy_teardown_on_a_real_cluster(tmp_path: Path) -> None:
    """Needs a cluster whose nodes can pull MYRIAD_TEST_IMAGE (default the cpu image) and reach
    the store MYRIAD_TEST_STORE with the plan's models traced; the servers are not pinned to
    instance types (pin_nodes=False), so any untainted node runs them."""
    from packing.io import save

    image = os.environ.get("MYRIAD_TEST_IMAGE", "myriad/server-cpu:latest")
    store = os.environ.get("MYRIAD_TEST_STORE")
    plan = example_plan("apply-a")
    plan = Plan(
        **{**{f: getattr(plan, f) for f in plan.__struct_fields__}, "servers": plan.servers[:1]}
    )
    plan_path = save(plan, tmp_path / "plan.json")
    runtime = KubernetesRuntime(
        kubeconfig=os.environ["MYRIAD_TEST_KUBECONFIG"], poll_s=1.0, pin_nodes=False
    )
    options = DeployOptions(
        name="k8s-test", store_uri=store, images={"cpu": image}, ready_timeout_s=600
    )
    deployment = runtime.deploy(plan, plan_path, options)
    try:
        assert {s.state for s in runtime.status(deployment)} == {"ready"}
        result = runtime.redeploy(deployment, plan, plan_path, options)
        assert result.kept == sorted(s.id for s in plan.servers) and not result.started
    finally:
        assert sorted(runtime.teardown(deployment)) == sorted(s.id for s in plan.servers)
