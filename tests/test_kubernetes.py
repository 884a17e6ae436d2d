"""The Kubernetes runtime's manifests against the Kubernetes schemas, its routing and redeploy
rules, the eksctl config, and (with MYRIAD_TEST_KUBECONFIG) a real apply on a cluster.

The committed examples under infra/k8s are regenerated here; MYRIAD_REGENERATE=1 rewrites them.
"""

from __future__ import annotations

import base64
import json
import os
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from packing.contracts import Catalog, Plan, PlannedInstance, PlannedServer
from packing.io import load, to_json
from serving.deployments import DeployError
from serving.runtimes import eks
from serving.runtimes.base import DeployOptions
from serving.runtimes.kubernetes import KubernetesRuntime, pod_reason, rolled_out
from serving.runtimes.manifests import (
    FINGERPRINT_ANNOTATION,
    KINDS,
    ORCHESTRATOR_NAMESPACE,
    ORCHESTRATOR_POD_LABELS,
    ORCHESTRATOR_RULES,
    ORCHESTRATOR_SERVICE_ACCOUNT,
    manifest_files,
    model_label,
    namespace_for,
    orchestrator_files,
    orchestrator_objects,
    pod_manifests,
    render,
    server_service_account,
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
ROLE = "arn:aws:iam::123456789012:role/myriad-myriad-server"
# The committed example: deployment `myriad` (namespace myriad, the work pool's), an S3 store
# read through the IRSA role eks-cluster.yaml makes.
EXAMPLE_OPTIONS = DeployOptions(
    name="myriad", store_uri="s3://myriad-example/store", images=IMAGES, role_arn=ROLE
)


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
def options() -> DeployOptions:
    # Rendering reads no store: fingerprints hash processor, engine and model ids.
    return DeployOptions(name="example", store_uri="s3://myriad-test/store", images=IMAGES)


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
    options = DeployOptions(
        **{
            **{f: getattr(options, f) for f in options.__struct_fields__},
            "role_arn": ROLE,
            "store_credentials": {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "key"},
        }
    )
    objects = render(example_plan(), CATALOG, options, IMAGES, hpa=True)
    objects += orchestrator_objects(options, role_arn=ROLE)
    kinds = {o["kind"] for o in objects}
    assert kinds == {
        "Namespace",
        "ServiceAccount",
        "Secret",
        "ConfigMap",
        "NetworkPolicy",
        "Role",
        "RoleBinding",
        "ClusterRole",
        "ClusterRoleBinding",
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
    assert not _by_kind(objects, "Secret") and "envFrom" not in big
    with_role = render(plan, CATALOG, _replace(options, role_arn=ROLE), IMAGES)
    assert _by_kind(with_role, "ServiceAccount")[0]["metadata"]["annotations"] == {
        "eks.amazonaws.com/role-arn": ROLE
    }
    for d in _by_kind(with_role, "Deployment"):
        assert d["spec"]["template"]["spec"]["serviceAccountName"] == "myriad-server"


def test_servers_answer_grpc_on_their_service(options: DeployOptions) -> None:
    """Each server listens for KServe v2 over gRPC on 8081 (a containerPort named grpc), and its
    Service publishes it beside HTTP; the server flags the deployment adds cannot move it."""
    plan = example_plan()
    objects = render(plan, CATALOG, _replace(options, server_args=["--grpc-port", "9"]), IMAGES)
    services = {s["metadata"]["name"]: s for s in _by_kind(objects, "Service")}
    for d in _by_kind(objects, "Deployment"):
        container = d["spec"]["template"]["spec"]["containers"][0]
        args = container["args"]
        assert args[-2:] == ["--grpc-port", "8081"]
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        assert ports == {"http": 8080, "grpc": 8081}
        service = services[d["metadata"]["name"]]
        assert {
            port["name"]: (port["port"], port["targetPort"]) for port in service["spec"]["ports"]
        } == {
            "http": (8080, "http"),
            "grpc": (8081, "grpc"),
        }
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)
        kubernetes_validate.validate(service, K8S_VERSION, strict=True)


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


def test_pod_manifests_for_podman_kube_play(tmp_path: Path) -> None:
    # A local file store is refused for a cluster, mounted for podman kube play.
    options = DeployOptions(name="example", store_uri=f"file://{tmp_path}/store", images=IMAGES)
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
    assert [port["name"] for port in container["ports"]] == ["http"]  # podman would publish grpc
    store = options.store_uri.removeprefix("file://")
    assert {"name": "store", "mountPath": store, "readOnly": True} in container["volumeMounts"]
    for document in documents:
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)
    with pytest.raises(DeployError, match="no servers"):
        pod_manifests(plan, ["nope"], options=options)
    # Host networking: each server on its own port of the host, no hostPort.
    text = pod_manifests(
        plan,
        catalog=CATALOG,
        options=options,
        host_ports={"i000-c5-large-d0": 18081},
        host_network=True,
        server_ids=["i000-c5-large-d0"],
    )
    deployment = list(yaml.safe_load_all(text))[1]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["hostNetwork"] is True
    assert container["args"][container["args"].index("--port") + 1] == "18081"
    assert "--grpc-port" not in container["args"]  # one port for every pod on the host: none
    assert "ports" not in container
    assert container["readinessProbe"]["httpGet"]["port"] == 18081
    kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


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
    config = eks.cluster_config(plan, CATALOG, "myriad", "us-east-1", options=EXAMPLE_OPTIONS)
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
        EXAMPLE_OPTIONS,
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
    options = EXAMPLE_OPTIONS
    # Fingerprints fixed, so the example does not depend on the machine.
    prints = {s.id: f"sha256:{'0' * 63}{i}" for i, s in enumerate(plan.servers)}
    files = {INFRA / "example-plan.json": to_json(plan).decode()}
    config = eks.cluster_config(plan, CATALOG, "myriad", "us-east-1", options=options)
    files[INFRA / "eks-cluster.yaml"] = eks.to_yaml(config, plan)
    files[INFRA / "addons.sh"] = eks.addons_script("myriad", "us-east-1")
    objects = render(plan, CATALOG, options, IMAGES, fingerprints=prints)
    for name, text in manifest_files(objects).items():
        files[INFRA / plan.plan_id / name] = text
    orchestrator_arn = eks.role_arn("123456789012", eks.orchestrator_role_name("myriad"))
    rbac = orchestrator_objects(options, role_arn=orchestrator_arn)
    for name, text in orchestrator_files(rbac).items():
        files[INFRA / "orchestrator" / name] = text
    return files


def test_committed_examples_are_in_step(tmp_path: Path) -> None:
    files = _committed()
    # What infra/k8s/README.md's step 2 runs for a plan gives the same cluster files.
    written = eks.write_cluster_files(
        example_plan(),
        CATALOG,
        "myriad",
        "us-east-1",
        EXAMPLE_OPTIONS,
        tmp_path,
        account_id="123456789012",
    )
    for path in written:
        assert path.read_text() == files[INFRA / path.relative_to(tmp_path)], path
    if REGENERATE:
        for path, text in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    for path, text in files.items():
        assert path.is_file(), f"{path} missing: MYRIAD_REGENERATE=1 pytest {__file__}"
        assert path.read_text() == text, f"{path} is stale: MYRIAD_REGENERATE=1 pytest {__file__}"
    for folder in ("example", "orchestrator"):
        listed = {
            p for p in files if p.parent == INFRA / folder or p.parent.parent == INFRA / folder
        }
        assert set((INFRA / folder).rglob("*.yaml")) == listed


@pytest.mark.skipif(
    not os.environ.get("MYRIAD_TEST_KUBECONFIG") or not os.environ.get("MYRIAD_TEST_STORE"),
    reason="no Kubernetes cluster here: set MYRIAD_TEST_KUBECONFIG and MYRIAD_TEST_STORE "
    "(s3://...) to apply for real",
)
def test_apply_wait_redeploy_teardown_on_a_real_cluster(tmp_path: Path) -> None:
    """Needs a cluster whose nodes can pull MYRIAD_TEST_IMAGE (default the cpu image) and reach
    the S3 store MYRIAD_TEST_STORE with the plan's models traced (AWS_* variables given to the
    servers through a rendered Secret); the servers are not pinned to
    instance types (pin_nodes=False), so any untainted node runs them."""
    from packing.io import save

    image = os.environ.get("MYRIAD_TEST_IMAGE", "myriad/server-cpu:latest")
    store = os.environ["MYRIAD_TEST_STORE"]
    credentials = {
        k: v
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ENDPOINT_URL")
        if (v := os.environ.get(k))
    }
    plan = example_plan("apply-a")
    plan = Plan(
        **{**{f: getattr(plan, f) for f in plan.__struct_fields__}, "servers": plan.servers[:1]}
    )
    plan_path = save(plan, tmp_path / "plan.json")
    runtime = KubernetesRuntime(
        kubeconfig=os.environ["MYRIAD_TEST_KUBECONFIG"], poll_s=1.0, pin_nodes=False
    )
    options = DeployOptions(
        name="k8s-test",
        store_uri=store,
        images={"cpu": image},
        ready_timeout_s=600,
        store_credentials=credentials,
    )
    deployment = runtime.deploy(plan, plan_path, options)
    try:
        assert {s.state for s in runtime.status(deployment)} == {"ready"}
        result = runtime.redeploy(deployment, plan, plan_path, options)
        assert result.kept == sorted(s.id for s in plan.servers) and not result.started
    finally:
        assert sorted(runtime.teardown(deployment)) == sorted(s.id for s in plan.servers)


def _replace(options: DeployOptions, **changes) -> DeployOptions:
    return DeployOptions(
        **{**{f: getattr(options, f) for f in options.__struct_fields__}, **changes}
    )


def test_a_cluster_deploy_without_an_s3_store_is_refused(tmp_path: Path) -> None:
    plan = example_plan()
    for store in (None, f"file://{tmp_path}/store", str(tmp_path / "store")):
        options = DeployOptions(name="example", store_uri=store, images=IMAGES)
        with pytest.raises(DeployError, match=r"--store s3://<bucket>/<prefix>"):
            render(plan, CATALOG, options, IMAGES)
        with pytest.raises(DeployError, match=r"--store s3://"):
            write_manifests(plan, tmp_path / "out", CATALOG, options, IMAGES)
        # The runtime refuses before it reads a store or reaches a cluster.
        with pytest.raises(DeployError, match=r"--store s3://"):
            KubernetesRuntime(catalog=CATALOG, kubeconfig=tmp_path / "none").deploy(
                plan, tmp_path / "plan.json", options
            )
    assert not (tmp_path / "out").exists()
    s3 = DeployOptions(name="example", store_uri="s3://bucket/prefix")
    with pytest.raises(DeployError, match="role ARN"):
        render(plan, CATALOG, _replace(s3, role_arn="my-role"), IMAGES)
    with pytest.raises(DeployError, match="environment variable names"):
        render(plan, CATALOG, _replace(s3, store_credentials={"AWS KEY": "x"}), IMAGES)


def test_rendering_an_s3_deploy_needs_no_credentials(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The user's --render-only with --store s3://... on a machine with no AWS credentials: no
    store is opened, nothing is written into it (an unreachable endpoint would fail any call)."""
    for key in list(os.environ):
        if key.startswith("AWS_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    import serving.store

    def no_store(*args, **kwargs):
        raise AssertionError("rendering opened a store")

    monkeypatch.setattr(serving.store, "open_store", no_store)
    monkeypatch.setattr("serving.runtimes.base.open_store", no_store)
    plan = example_plan()
    options = _replace(EXAMPLE_OPTIONS, role_arn=None)
    written = write_manifests(plan, tmp_path / "k8s", CATALOG, options, IMAGES)
    assert written
    objects = render(plan, CATALOG, options, IMAGES)
    for d in _by_kind(objects, "Deployment"):
        env = {e["name"]: e["value"] for e in d["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["MYRIAD_STORE"] == "s3://myriad-example/store"
    # Plan fingerprints: the same plan renders the same; an engine change changes them all.
    again = render(plan, CATALOG, options, IMAGES)
    assert [d["metadata"]["annotations"] for d in _by_kind(again, "Deployment")] == [
        d["metadata"]["annotations"] for d in _by_kind(objects, "Deployment")
    ]


def test_store_credentials_become_a_secret_the_servers_read(options: DeployOptions) -> None:
    credentials = {
        "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "secret/with+chars",
        "AWS_ENDPOINT_URL": "http://seaweedfs.storage:8333",
        "AWS_REGION": "us-east-1",
    }
    plan = example_plan()
    objects = render(plan, CATALOG, _replace(options, store_credentials=credentials), IMAGES)
    (secret,) = _by_kind(objects, "Secret")
    assert secret["metadata"]["name"] == "myriad-store-credentials"
    assert secret["metadata"]["namespace"] == namespace_for(options)
    decoded = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert decoded == credentials
    for d in _by_kind(objects, "Deployment"):
        container = d["spec"]["template"]["spec"]["containers"][0]
        assert container["envFrom"] == [{"secretRef": {"name": "myriad-store-credentials"}}]
    files = manifest_files(objects)
    assert "AKIAEXAMPLE" not in files["plan.yaml"]
    assert yaml.safe_load(files["store-secret.yaml"])["kind"] == "Secret"
    # A Secret made elsewhere: named, not rendered.
    named = render(plan, CATALOG, _replace(options, store_secret="s3-access"), IMAGES)
    assert not _by_kind(named, "Secret")
    for d in _by_kind(named, "Deployment"):
        container = d["spec"]["template"]["spec"]["containers"][0]
        assert container["envFrom"] == [{"secretRef": {"name": "s3-access"}}]


def test_network_policy_admits_only_ingress_gateway_metrics_and_orchestrator(
    options: DeployOptions,
) -> None:
    objects = render(example_plan(), CATALOG, options, IMAGES)
    (policy,) = _by_kind(objects, "NetworkPolicy")
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    for d in _by_kind(objects, "Deployment"):
        assert _matches(
            spec["podSelector"]["matchLabels"], d["spec"]["template"]["metadata"]["labels"]
        )
    (rule,) = spec["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 8080}, {"protocol": "TCP", "port": 8081}]
    peers = rule["from"]
    namespaces = [
        p.get("namespaceSelector", {}).get("matchLabels", {}).get("kubernetes.io/metadata.name")
        for p in peers
    ]
    assert namespaces == ["ingress-nginx", None, "monitoring", ORCHESTRATOR_NAMESPACE]
    assert peers[1] == {
        "podSelector": {
            "matchLabels": {
                "app.kubernetes.io/instance": "example",
                "app.kubernetes.io/component": "gateway",
            }
        }
    }
    assert peers[2]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}
    assert peers[3]["podSelector"]["matchLabels"] == ORCHESTRATOR_POD_LABELS
    without = render(example_plan(), CATALOG, options, IMAGES, network_policy=False)
    assert not _by_kind(without, "NetworkPolicy")


def test_namespace_and_service_account_equal_the_eksctl_iam_service_account() -> None:
    """By construction: the eksctl config binds the servers' role to the namespace and
    ServiceAccount the manifests render, for any deployment name."""
    plan = example_plan()
    for options in (
        EXAMPLE_OPTIONS,
        DeployOptions(name="prod", store_uri="s3://b/p"),
        DeployOptions(name="myriad-eu", store_uri="s3://b/p"),
        DeployOptions(name="x", namespace="serving", store_uri="s3://b/p"),
    ):
        config = eks.cluster_config(plan, CATALOG, "c1", "eu-west-1", options=options)
        accounts = {
            a["roleName"]: a["metadata"]
            for a in config["iam"]["serviceAccounts"]
            if "roleName" in a
        }
        server = accounts[eks.server_role_name("c1", options)]
        objects = render(plan, CATALOG, options, IMAGES)
        (account,) = _by_kind(objects, "ServiceAccount")
        assert server == {
            "name": account["metadata"]["name"],
            "namespace": account["metadata"]["namespace"],
        }
        assert server == {
            "name": server_service_account(options),
            "namespace": namespace_for(options),
        }
        for d in _by_kind(objects, "Deployment"):
            assert d["metadata"]["namespace"] == server["namespace"]
            assert d["spec"]["template"]["spec"]["serviceAccountName"] == server["name"]
        assert accounts[eks.orchestrator_role_name("c1")] == {
            "name": ORCHESTRATOR_SERVICE_ACCOUNT,
            "namespace": ORCHESTRATOR_NAMESPACE,
        }
    assert namespace_for(DeployOptions(name="prod")) == "myriad-prod"
    assert namespace_for(DeployOptions(name="myriad")) == "myriad"
    # The committed config and example agree too.
    committed = yaml.safe_load((INFRA / "eks-cluster.yaml").read_text())
    names = {a["metadata"]["name"]: a["metadata"] for a in committed["iam"]["serviceAccounts"]}
    plan_yaml = list(yaml.safe_load_all((INFRA / "example" / "plan.yaml").read_text()))
    (account,) = [d for d in plan_yaml if d["kind"] == "ServiceAccount"]
    assert names["myriad-server"] == {
        "name": "myriad-server",
        "namespace": account["metadata"]["namespace"],
    }
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].endswith(
        "/"
        + next(
            a["roleName"]
            for a in committed["iam"]["serviceAccounts"]
            if a["metadata"]["name"] == "myriad-server"
        )
    )


def test_orchestrator_rbac_covers_what_a_deploy_touches_and_no_more() -> None:
    objects = orchestrator_objects(EXAMPLE_OPTIONS)
    (role,) = _by_kind(objects, "Role")
    granted = {
        (group, resource): set(rule["verbs"])
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    plural = {
        "ServiceAccount": "serviceaccounts",
        "Secret": "secrets",
        "ConfigMap": "configmaps",
        "NetworkPolicy": "networkpolicies",
        "Deployment": "deployments",
        "Service": "services",
        "PodDisruptionBudget": "poddisruptionbudgets",
        "HorizontalPodAutoscaler": "horizontalpodautoscalers",
        "Ingress": "ingresses",
    }
    wanted = {
        (api_version.split("/")[0] if "/" in api_version else "", plural[kind])
        for api_version, kind in KINDS
        if kind != "Namespace"
    }
    assert set(granted) == wanted | {("", "pods")}
    for key in wanted:
        assert granted[key] == {"get", "list", "create", "patch", "delete"}, key
    assert granted[("", "pods")] == {"get", "list"}
    assert role["rules"] == ORCHESTRATOR_RULES
    assert role["metadata"]["namespace"] == namespace_for(EXAMPLE_OPTIONS)
    (binding,) = _by_kind(objects, "RoleBinding")
    assert binding["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": "myriad-orchestrator",
            "namespace": ORCHESTRATOR_NAMESPACE,
        }
    ]
    (cluster_role,) = _by_kind(objects, "ClusterRole")
    assert cluster_role["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["namespaces"],
            "resourceNames": ["myriad"],
            "verbs": ["get"],
        }
    ]
    # A teardown deletes by the deployment's instance label: the orchestrator carries none.
    for obj in objects:
        assert "app.kubernetes.io/instance" not in obj["metadata"]["labels"]
    for obj in orchestrator_objects(DeployOptions(name="prod")):
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_work_pool_names_the_rendered_orchestrator_and_the_built_image() -> None:
    prefect = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    variables = prefect["definitions"]["k8s_pool"]["job_variables"]
    assert variables["namespace"] == ORCHESTRATOR_NAMESPACE
    assert variables["service_account_name"] == ORCHESTRATOR_SERVICE_ACCOUNT
    assert "MYRIAD_ORCHESTRATOR_IMAGE" in variables["image"]
    pool = json.loads((ROOT / "flows" / "work_pools" / "kubernetes.json").read_text())
    defaults = pool["variables"]["properties"]
    assert defaults["namespace"]["default"] == ORCHESTRATOR_NAMESPACE
    assert defaults["service_account_name"]["default"] == ORCHESTRATOR_SERVICE_ACCOUNT
    assert defaults["image"]["default"].split(":")[0].endswith("/orchestrator")
    template = pool["job_configuration"]["job_manifest"]["spec"]["template"]
    assert template["metadata"]["labels"] == ORCHESTRATOR_POD_LABELS
    from serving.build.images import ORCHESTRATOR, dockerfile_for, image_tag

    assert dockerfile_for(ORCHESTRATOR).is_file()
    assert image_tag(ORCHESTRATOR, "1.dkr.ecr.us-east-1.amazonaws.com/myriad").startswith(
        "1.dkr.ecr.us-east-1.amazonaws.com/myriad/orchestrator:"
    )
    # The deployment the k8s pool deploys serves in the namespace the RBAC was rendered for.
    for deployment in prefect["deployments"]:
        name = deployment.get("parameters", {}).get("deployment_name") or deployment.get(
            "parameters", {}
        ).get("deployment")
        if deployment["work_pool"]["name"] == "myriad-k8s" and name:
            assert namespace_for(DeployOptions(name=name)) == namespace_for(EXAMPLE_OPTIONS)
