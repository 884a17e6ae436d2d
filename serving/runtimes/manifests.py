"""A plan rendered into Kubernetes objects: pure (no cluster), kustomize-ready files with one
folder per plan, and the pod specs ``podman kube play`` runs in tests. ``serving.runtimes.
kubernetes`` applies what this renders.

Longer than most modules because every object of a plan is rendered together against one set
of conventions (labels, taints, names, probes, resources); split by object kind, each part would
import the others' conventions and helpers.

Conventions (the eksctl config in ``serving.runtimes.eks`` follows the same ones):
- Every node group of server nodes carries the taint ``myriad.io/processor=<cpu|gpu|inf>:
  NoSchedule`` and the label ``myriad.io/processor``; a server tolerates its processor's taint
  (plus ``nvidia.com/gpu`` / ``aws.amazon.com/neuron`` NoSchedule, the device plugins' own) and
  is pinned to its instance type by ``node.kubernetes.io/instance-type``. System pods (DNS, the
  ingress controller, the autoscaler) tolerate none of these, so they stay off server nodes and
  never take the room a server was sized for.
- One deployment, one namespace (``namespace_for``: ``options.namespace``, else the deployment
  name prefixed ``myriad-`` unless it is ``myriad`` or starts with ``myriad-``), and the servers
  run as the ServiceAccount ``server_service_account``; the eksctl config's IAM service account
  and the orchestrator's RBAC name the same two, from the same functions.
- Servers read their models from an ``s3://`` store (``MYRIAD_STORE`` in their environment):
  a local store is refused, since no pod can read it. Their access is an IAM role on their
  ServiceAccount (``options.role_arn``, EKS IRSA) or a Secret of AWS variables mounted with
  envFrom (``options.store_secret``, rendered from ``options.store_credentials`` when given).
  Rendering reads no store and needs no credentials: a server's fingerprint hashes what the plan
  says (processor, engine, model ids) unless ``render`` is given fingerprints (the runtime
  passes the store's, which cover each model's artifact manifest).
- A NetworkPolicy admits to the servers' port only the ingress controller's namespace, this
  deployment's gateway pods, the Prometheus pods of the metrics namespace and the orchestrator's
  flow runs.
- Only what a server runs goes into its pod template: its models, processor, image, engine
  flags, store and fingerprint. The plan id is not there (it lives on the ConfigMap and the
  Ingress), so a server whose fingerprint and name a new plan keeps renders byte-identical and
  a redeploy leaves its pod alone.
"""

from __future__ import annotations

import base64
import hashlib
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from packing.contracts import Catalog, InstanceType, Plan, PlannedServer
from packing.io import to_json, write_atomic
from serving.grpc import GRPC_PORT
from serving.runtimes.base import (
    SERVER_PORT,
    DeployError,
    DeployOptions,
    server_arguments,
    server_fingerprint,
)

# ------------------------------------------------------------------------------ conventions

PLAN_DIR = "/etc/myriad"
PLAN_FILE = f"{PLAN_DIR}/plan.json"
CACHE_DIR = "/var/lib/myriad"
RUN_AS_USER = 10001
FIELD_MANAGER = "myriad"
PLAN_CONFIGMAP = "myriad-plan"
SERVICE_ACCOUNT = "myriad-server"
# The Secret rendered from options.store_credentials when options.store_secret names none.
STORE_SECRET = "myriad-store-credentials"
# Environment variable names (the keys of a store Secret become the servers' environment).
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# What may reach a server (the NetworkPolicy): the ingress controller's namespace (addons.sh
# installs ingress-nginx there), Prometheus pods (app.kubernetes.io/name: prometheus, as
# kube-prometheus-stack labels them) in the metrics namespace, this deployment's gateway pods,
# and the orchestrator's flow runs (the Kubernetes work pool's Jobs, which load-test).
INGRESS_NAMESPACE = "ingress-nginx"
METRICS_NAMESPACE = "monitoring"
METRICS_POD_LABELS = {"app.kubernetes.io/name": "prometheus"}
# What a cluster's Prometheus discovers the servers' pods by (the prometheus.io annotations of
# its kubernetes_sd pod job); their labels carry the deployment and the plan's server id.
SCRAPE_ANNOTATIONS = {
    "prometheus.io/scrape": "true",
    "prometheus.io/port": "8080",
    "prometheus.io/path": "/metrics",
}
# The orchestrator: the Kubernetes work pool's namespace and ServiceAccount (prefect.yaml,
# flows/work_pools/kubernetes.json); its Jobs' pods carry ORCHESTRATOR_POD_LABELS.
ORCHESTRATOR_NAMESPACE = "myriad"
ORCHESTRATOR_SERVICE_ACCOUNT = "myriad-orchestrator"
ORCHESTRATOR_POD_LABELS = {
    "app.kubernetes.io/name": "myriad",
    "app.kubernetes.io/component": "orchestrator",
}
DEFAULT_IMAGE = "myriad/server-{processor}:latest"
# ingress-nginx keeps an Ingress in one object of at most 1 MiB (etcd's limit); 500 paths is
# about 100 KB, so shards stay far below it.
PATHS_PER_INGRESS = 500
# A ConfigMap holds at most 1 MiB of data.
CONFIGMAP_LIMIT = 1 << 20

NAME = "app.kubernetes.io/name"
INSTANCE = "app.kubernetes.io/instance"
COMPONENT = "app.kubernetes.io/component"
PART_OF = "app.kubernetes.io/part-of"
MANAGED_BY = "app.kubernetes.io/managed-by"
VERSION = "app.kubernetes.io/version"
PLAN_LABEL = "myriad.io/plan"
SERVER_LABEL = "myriad.io/server"
PROCESSOR_LABEL = "myriad.io/processor"
FINGERPRINT_LABEL = "myriad.io/fingerprint"  # the first 16 hex digits (label values: 63 chars)
FINGERPRINT_ANNOTATION = "myriad.io/fingerprint"  # the whole "sha256:..." digest
MODEL_ANNOTATION = "myriad.io/model"
MODEL_LABEL_PREFIX = "m.myriad.io/"  # m.myriad.io/<model id>: "true" on every pod holding it
CREATED_BY = "myriad.io/created-by"  # on a Namespace Myriad created: the deployment's name

DEVICE_RESOURCES = {"gpu": "nvidia.com/gpu", "inf": "aws.amazon.com/neuron"}

_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
# ingress-nginx's strict path validation accepts only these characters in Exact/Prefix paths.
_NGINX_STRICT_PATH = re.compile(r"^/[A-Za-z0-9_/-]*$")

# What kinds Myriad makes, in the order they are applied (teardown deletes in reverse).
KINDS: list[tuple[str, str]] = [
    ("v1", "Namespace"),
    ("v1", "ServiceAccount"),
    ("v1", "Secret"),
    ("v1", "ConfigMap"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
    ("apps/v1", "Deployment"),
    ("v1", "Service"),
    ("policy/v1", "PodDisruptionBudget"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"),
    ("networking.k8s.io/v1", "Ingress"),
]


def default_namespace(deployment_name: str) -> str:
    """The namespace of a deployment given none: its name prefixed ``myriad-``, except a name
    that is ``myriad`` or already starts with ``myriad-`` (deployment ``myriad`` serves in
    ``myriad``, ``prod`` in ``myriad-prod``)."""
    if deployment_name == "myriad" or deployment_name.startswith("myriad-"):
        return deployment_name
    return f"myriad-{deployment_name}"


def namespace_for(options: DeployOptions) -> str:
    """The namespace a deployment's objects go in: ``options.namespace`` or the default above.
    The eksctl config's IAM service account for the servers uses it too."""
    return options.namespace or default_namespace(options.name)


def server_service_account(options: DeployOptions) -> str:
    """The ServiceAccount the servers run as, in ``namespace_for(options)``: the one the eksctl
    config binds the servers' IAM role to (IRSA)."""
    return SERVICE_ACCOUNT


def store_secret_name(options: DeployOptions) -> str | None:
    """The Secret the servers take their store credentials from, or None (no Secret: an IAM
    role, or the node's own)."""
    if options.store_secret:
        return options.store_secret
    return STORE_SECRET if options.store_credentials else None


def check_cluster_store(options: DeployOptions) -> None:
    """Refuse options whose servers could not read their models in a cluster: no store (a
    server would read an empty local one), a local store, malformed credentials or role."""
    uri = options.store_uri
    if not uri:
        raise DeployError(
            "a Kubernetes deployment needs the store its models were traced into, and none was "
            "given: give --store s3://<bucket>/<prefix> (servers in a cluster read only s3://)"
        )
    if uri.startswith("s3://") and not uri.removeprefix("s3://").split("/")[0]:
        raise DeployError(f"store URI {uri!r} names no bucket: give s3://<bucket>/<prefix>")
    if not uri.startswith("s3://"):
        raise DeployError(
            f"the cluster's servers cannot read the store {uri!r} (it is on this machine): "
            "copy the models to S3 and give --store s3://<bucket>/<prefix>"
        )
    if options.role_arn is not None and not re.match(
        r"^arn:aws[a-z-]*:iam::\d{12}:role/\S+$", options.role_arn
    ):
        raise DeployError(
            f"role ARN {options.role_arn!r}: give arn:aws:iam::<account>:role/<name> "
            "(eks-cluster.yaml's server role, e.g. <cluster>-<namespace>-server)"
        )
    bad = sorted(k for k in options.store_credentials if not _ENV_NAME.match(k))
    if bad:
        raise DeployError(f"store credentials {bad}: keys become environment variable names")
    name = store_secret_name(options)
    if name is not None and not _DNS_1123_SUBDOMAIN.match(name):
        raise DeployError(f"store Secret name {name!r} is not a DNS subdomain name")


def service_url(server_id: str, namespace: str) -> str:
    return f"http://{server_id}.{namespace}.svc.cluster.local:{SERVER_PORT}"


def model_label(model_id: str) -> str:
    """The pod label key that marks a pod as holding ``model_id``. A model id that is not a
    valid label name (one ending in '.', '-' or '_') gets a hashed name instead."""
    if _LABEL_NAME.match(model_id):
        return MODEL_LABEL_PREFIX + model_id
    return MODEL_LABEL_PREFIX + "h-" + hashlib.sha256(model_id.encode()).hexdigest()[:32]


def model_service_name(model_id: str) -> str:
    """The Service of a model that several servers hold: ``model-<id, made a DNS label>-<hash>``."""
    stem = re.sub(r"[^a-z0-9-]", "-", model_id)[:40].strip("-")
    digest = hashlib.sha256(model_id.encode()).hexdigest()[:10]
    return f"model-{stem}-{digest}" if stem else f"model-{digest}"


def _version() -> str:
    try:
        return metadata.version("myriad")
    except metadata.PackageNotFoundError:  # pragma: no cover - an uninstalled checkout
        return "0.0.0"


def _meta(
    name: str,
    namespace: str | None,
    labels: Mapping[str, str],
    annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    meta["labels"] = dict(labels)
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def _base_labels(deployment_name: str, component: str) -> dict[str, str]:
    return {
        NAME: "myriad",
        INSTANCE: deployment_name,
        COMPONENT: component,
        PART_OF: "myriad",
        MANAGED_BY: "myriad",
        VERSION: _version(),
    }


# --------------------------------------------------------------------------------- resources


def _round_down(value: float, step: int) -> int:
    return max(step, int(value // step) * step)


def server_resources(
    server: PlannedServer, instance_type: InstanceType | None, servers_on_instance: int = 1
) -> dict[str, dict[str, str | int]]:
    """Requests = limits (Guaranteed QoS: a server is the last thing the kubelet evicts under
    memory pressure). With the instance type known, a server gets its share of the instance: the
    vCPUs and host memory less what the kubelet, the system and the DaemonSets need (0.25 vCPU +
    2% of the vCPUs, 1 GiB + 6% of the memory), divided over the instance's devices (one server
    per device; more servers than devices divide by the servers). Without a catalog: 1 vCPU and
    the plan's model memory plus 1 GiB."""
    if instance_type is not None:
        share = max(instance_type.devices, servers_on_instance)
        cpu_m = (instance_type.vcpus * 1000 - 250 - 20 * instance_type.vcpus) / share
        host_mib = instance_type.host_memory_gib * 1024
        memory_mib = (host_mib - 1024 - 0.06 * host_mib) / share
        cpu, memory = f"{_round_down(cpu_m, 10)}m", f"{_round_down(memory_mib, 16)}Mi"
    else:
        model_mib = server.memory_bytes / 2**20 if server.processor == "cpu" else 0
        cpu, memory = "1", f"{_round_down(model_mib * 1.25 + 1024, 16)}Mi"
    amounts: dict[str, str | int] = {"cpu": cpu, "memory": memory}
    device = DEVICE_RESOURCES.get(server.processor)
    if device is not None:
        amounts[device] = 1
    return {"requests": dict(amounts), "limits": dict(amounts)}


def tolerations(processor: str) -> list[dict[str, str]]:
    """The taints of the node group a server of ``processor`` runs on (see the module doc)."""
    result = [
        {"key": PROCESSOR_LABEL, "operator": "Equal", "value": processor, "effect": "NoSchedule"}
    ]
    device = DEVICE_RESOURCES.get(processor)
    if device is not None:
        result.append({"key": device, "operator": "Exists", "effect": "NoSchedule"})
    return result


# ----------------------------------------------------------------------------------- render


def render(
    plan: Plan,
    catalog: Catalog | None,
    options: DeployOptions,
    images: Mapping[str, str] | None = None,
    *,
    fingerprints: Mapping[str, str] | None = None,
    ingress_class: str = "nginx",
    ingress_host: str | None = None,
    hpa: bool = False,
    hpa_max_replicas: int = 4,
    startup_timeout_s: float | None = None,
    pin_nodes: bool = True,
    network_policy: bool = True,
    cluster_store: bool = True,
) -> list[dict[str, Any]]:
    """Every object of ``plan``'s deployment, in apply order: Namespace, ServiceAccount (with
    ``options.role_arn`` as its IRSA role), the store Secret (from ``options.store_credentials``),
    the plan ConfigMap, the NetworkPolicy, per server a Deployment, Service and
    PodDisruptionBudget (and an HPA with ``hpa``), a Service per replicated model, the Ingress
    shards. Reads no store and no cluster.

    ``images``: image per processor (default ``options.images``, then ``myriad build``'s tag).
    ``fingerprints``: per server id (default: from the plan alone, :func:`plan_fingerprints`;
    the runtime passes the store's). ``startup_timeout_s``: how long a server may take to load
    its models before the kubelet restarts it (default: ``options.ready_timeout_s``, at least
    10 minutes). ``pin_nodes=False`` drops the instance-type node selector (a test cluster);
    ``network_policy=False`` the NetworkPolicy. ``cluster_store=False`` lets a local store
    through (``pod_manifests``, which mounts it); otherwise :func:`check_cluster_store`
    refuses options whose servers could not read their models."""
    if cluster_store:
        check_cluster_store(options)
    images = dict(images if images is not None else options.images)
    fingerprints = dict(
        fingerprints if fingerprints is not None else plan_fingerprints(plan, options)
    )
    namespace = namespace_for(options)
    name = options.name
    instance_types = {i.id: i.type for i in plan.instances}
    per_instance: dict[str, int] = {}
    for server in plan.servers:
        per_instance[server.instance] = per_instance.get(server.instance, 0) + 1
    for server in plan.servers:
        if not _DNS_1035.match(server.id):
            raise DeployError(
                f"server id {server.id!r} is not a DNS label starting with a letter; "
                "Kubernetes Service names must be"
            )
        if server.processor not in images:
            images[server.processor] = DEFAULT_IMAGE.format(processor=server.processor)
        if server.id not in fingerprints:
            raise DeployError(f"no fingerprint for server {server.id}")

    objects: list[dict[str, Any]] = [
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": _meta(namespace, None, _base_labels(name, "namespace")),
        }
    ]
    role = {"eks.amazonaws.com/role-arn": options.role_arn} if options.role_arn else None
    objects.append(
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": _meta(
                server_service_account(options), namespace, _base_labels(name, "server"), role
            ),
            # The servers never call the Kubernetes API. IRSA's web-identity token is a
            # projected volume of its own, mounted by the EKS webhook whatever this says.
            "automountServiceAccountToken": False,
        }
    )
    if options.store_credentials:
        objects.append(store_secret(options, namespace))
    objects.append(plan_configmap(plan, namespace, name))
    if network_policy:
        objects.append(server_network_policy(namespace, name))

    window = max(600.0, startup_timeout_s or options.ready_timeout_s)
    for server in plan.servers:
        instance_type = None
        if catalog is not None:
            try:
                instance_type = catalog.get(instance_types[server.instance])
            except KeyError as exc:
                raise DeployError(f"server {server.id}: {exc.args[0]}") from None
        objects.extend(
            _server_objects(
                server,
                instance_types[server.instance],
                instance_type,
                per_instance[server.instance],
                namespace=namespace,
                deployment_name=name,
                image=images[server.processor],
                fingerprint=fingerprints[server.id],
                options=options,
                startup_window_s=window,
                hpa=hpa,
                hpa_max_replicas=hpa_max_replicas,
                pin_nodes=pin_nodes,
            )
        )
    backends, model_services = model_backends(plan, namespace, name)
    taken = {s.id for s in plan.servers}
    for service in model_services:
        if service["metadata"]["name"] in taken:
            raise DeployError(f"Service name {service['metadata']['name']} is used twice")
    objects.extend(model_services)
    objects.extend(
        ingresses(plan, backends, namespace, name, ingress_class=ingress_class, host=ingress_host)
    )
    return objects


def plan_fingerprints(plan: Plan, options: DeployOptions) -> dict[str, str]:
    """Each server's fingerprint from the plan alone (processor, engine, model ids): what a
    render that reads no store gives. A model retrained under the same id leaves these
    unchanged; the runtime's fingerprints (``serving.runtimes.base.fingerprints``) also hash
    each model's artifact manifest in the store."""
    return {s.id: server_fingerprint(s, None, options.engine) for s in plan.servers}


def store_secret(options: DeployOptions, namespace: str) -> dict[str, Any]:
    """The Secret of ``options.store_credentials`` (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    AWS_REGION, AWS_ENDPOINT_URL, ...), named by :func:`store_secret_name`."""
    data = {
        key: base64.b64encode(value.encode()).decode()
        for key, value in sorted(options.store_credentials.items())
    }
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(
            store_secret_name(options) or STORE_SECRET,
            namespace,
            _base_labels(options.name, "store-credentials"),
        ),
        "type": "Opaque",
        "data": data,
    }


def server_network_policy(
    namespace: str,
    deployment_name: str,
    *,
    ingress_namespace: str = INGRESS_NAMESPACE,
    metrics_namespace: str = METRICS_NAMESPACE,
    orchestrator_namespace: str = ORCHESTRATOR_NAMESPACE,
) -> dict[str, Any]:
    """Ingress to the servers of ``deployment_name``, on their port only, from: every pod of
    the ingress controller's namespace; this deployment's gateway pods (component ``gateway``);
    the Prometheus pods of the metrics namespace; the orchestrator's flow runs (they load-test).
    Nothing else in the cluster reaches them. Kubelet probes come from the node, which
    NetworkPolicies do not govern."""

    def in_namespace(name: str, pods: Mapping[str, str] | None = None) -> dict[str, Any]:
        peer: dict[str, Any] = {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": name}}
        }
        if pods:
            peer["podSelector"] = {"matchLabels": dict(pods)}
        return peer

    peers = [
        in_namespace(ingress_namespace),
        {"podSelector": {"matchLabels": {INSTANCE: deployment_name, COMPONENT: "gateway"}}},
        in_namespace(metrics_namespace, METRICS_POD_LABELS),
        in_namespace(orchestrator_namespace, ORCHESTRATOR_POD_LABELS),
    ]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(
            f"{deployment_name}-servers",
            namespace,
            _base_labels(deployment_name, "network-policy"),
        ),
        "spec": {
            "podSelector": {"matchLabels": {INSTANCE: deployment_name, COMPONENT: "server"}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": peers,
                    "ports": [
                        {"protocol": "TCP", "port": SERVER_PORT},
                        {"protocol": "TCP", "port": GRPC_PORT},
                    ],
                }
            ],
        },
    }


def plan_configmap(plan: Plan, namespace: str, deployment_name: str) -> dict[str, Any]:
    data = to_json(plan).decode()
    if len(data) > CONFIGMAP_LIMIT:
        raise DeployError(
            f"plan {plan.plan_id} is {len(data)} bytes as JSON; a ConfigMap holds at most "
            f"{CONFIGMAP_LIMIT}"
        )
    labels = {**_base_labels(deployment_name, "plan"), PLAN_LABEL: _label_value(plan.plan_id)}
    # One ConfigMap, updated in place: servers read it only when they start, and a kept server's
    # entry is the same in the new plan, so a restart of it reads the same models.
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(PLAN_CONFIGMAP, namespace, labels),
        "data": {"plan.json": data},
    }


def _label_value(value: str) -> str:
    value = re.sub(r"[^A-Za-z0-9_.-]", "-", value)[:63].strip("-_.")
    return value or "none"


def _server_objects(
    server: PlannedServer,
    instance_type_name: str,
    instance_type: InstanceType | None,
    servers_on_instance: int,
    *,
    namespace: str,
    deployment_name: str,
    image: str,
    fingerprint: str,
    options: DeployOptions,
    startup_window_s: float,
    hpa: bool,
    hpa_max_replicas: int,
    pin_nodes: bool,
) -> list[dict[str, Any]]:
    selector = {INSTANCE: deployment_name, SERVER_LABEL: server.id}
    digest = fingerprint.split(":", 1)[-1][:16]
    labels = {
        **_base_labels(deployment_name, "server"),
        SERVER_LABEL: server.id,
        PROCESSOR_LABEL: server.processor,
        FINGERPRINT_LABEL: digest,
    }
    pod_labels = {k: v for k, v in labels.items() if k != VERSION}
    for model_id in sorted(server.model_ids):
        pod_labels[model_label(model_id)] = "true"
    annotations = {FINGERPRINT_ANNOTATION: fingerprint}
    env = [
        {"name": "MYRIAD_HOME", "value": CACHE_DIR},
        {"name": "HOME", "value": "/tmp"},
    ]
    if options.store_uri:
        env.append({"name": "MYRIAD_STORE", "value": options.store_uri})
    container: dict[str, Any] = {
        "name": "server",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["python", "-m", "serving"],
        # KServe v2 over gRPC beside HTTP, last: the port the container and Service name.
        "args": server_arguments(server.id, PLAN_FILE, SERVER_PORT, options, host="0.0.0.0")
        + ["--grpc-port", str(GRPC_PORT)],
        "env": env,
    }
    secret = store_secret_name(options)
    if secret:
        container["envFrom"] = [{"secretRef": {"name": secret}}]
    period = 10
    container.update(
        {
            "ports": [
                {"name": "http", "containerPort": SERVER_PORT, "protocol": "TCP"},
                {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
            ],
            "resources": server_resources(server, instance_type, servers_on_instance),
            # Loading hundreds of models takes minutes: the startup probe allows the whole
            # window before liveness takes over; ready means every model of the server loaded.
            "startupProbe": _probe(
                "/v2/health/ready", period, math.ceil(startup_window_s / period)
            ),
            "readinessProbe": _probe("/v2/health/ready", 5, 3),
            "livenessProbe": _probe("/v2/health/live", 10, 6),
            # Endpoints drop a terminating pod a moment after it is told to stop: keep serving
            # through that moment so no request lands on a closed socket.
            "lifecycle": {"preStop": {"exec": {"command": ["sleep", "10"]}}},
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": RUN_AS_USER,
                "runAsGroup": RUN_AS_USER,
                "readOnlyRootFilesystem": True,
                "allowPrivilegeEscalation": False,
                "capabilities": {"drop": ["ALL"]},
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "volumeMounts": [
                {"name": "plan", "mountPath": PLAN_DIR, "readOnly": True},
                {"name": "cache", "mountPath": CACHE_DIR},
                {"name": "tmp", "mountPath": "/tmp"},
            ],
        }
    )
    pod_spec: dict[str, Any] = {
        "serviceAccountName": server_service_account(options),
        "automountServiceAccountToken": False,
        # Thousands of Services in one namespace would be thousands of environment variables.
        "enableServiceLinks": False,
        "nodeSelector": (
            {"node.kubernetes.io/instance-type": instance_type_name} if pin_nodes else {}
        ),
        "tolerations": tolerations(server.processor),
        "terminationGracePeriodSeconds": 45,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {
                "name": "plan",
                "configMap": {
                    "name": PLAN_CONFIGMAP,
                    "items": [{"key": "plan.json", "path": "plan.json"}],
                },
            },
            {"name": "cache", "emptyDir": {}},
            {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "256Mi"}},
        ],
    }
    spec: dict[str, Any] = {}
    if not hpa:  # with an HPA, the HPA owns the replica count (server-side apply would fight it)
        spec["replicas"] = 1
    spec.update(
        {
            "revisionHistoryLimit": 3,
            "progressDeadlineSeconds": int(startup_window_s) + 300,
            "selector": {"matchLabels": selector},
            # The new pod is ready (all models loaded) before the old one stops.
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
            },
            "template": {
                "metadata": {
                    "labels": pod_labels,
                    "annotations": {**annotations, **SCRAPE_ANNOTATIONS},
                },
                "spec": pod_spec,
            },
        }
    )
    objects: list[dict[str, Any]] = [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": _meta(server.id, namespace, labels, annotations),
            "spec": spec,
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _meta(server.id, namespace, labels),
            "spec": {
                "type": "ClusterIP",
                "selector": selector,
                "ports": [
                    {"name": "http", "port": SERVER_PORT, "targetPort": "http", "protocol": "TCP"},
                    {"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "protocol": "TCP"},
                ],
            },
        },
        # A server has one replica. minAvailable: 1 (or maxUnavailable: 0) would refuse every
        # eviction of it, so a node drain, a node-group upgrade and the cluster autoscaler's
        # scale-down would hang forever. maxUnavailable: 1 lets a drain evict it (the server is
        # briefly down; a replicated model still answers from its other servers, and the
        # Deployment recreates the pod elsewhere), and it stops tools that honour budgets from
        # taking a server twice at once (an HPA-scaled server loses one pod at a time).
        # AlwaysAllow: a pod still loading (not ready) may be evicted too.
        {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": _meta(server.id, namespace, labels),
            "spec": {
                "maxUnavailable": 1,
                "selector": {"matchLabels": selector},
                "unhealthyPodEvictionPolicy": "AlwaysAllow",
            },
        },
    ]
    if hpa:
        objects.append(
            {
                "apiVersion": "autoscaling/v2",
                "kind": "HorizontalPodAutoscaler",
                "metadata": _meta(server.id, namespace, labels),
                "spec": {
                    "scaleTargetRef": {
                        "apiVersion": "apps/v1",
                        "kind": "Deployment",
                        "name": server.id,
                    },
                    "minReplicas": 1,
                    "maxReplicas": hpa_max_replicas,
                    "metrics": [
                        {
                            "type": "Resource",
                            "resource": {
                                "name": "cpu",
                                "target": {"type": "Utilization", "averageUtilization": 70},
                            },
                        }
                    ],
                },
            }
        )
    return objects


def _probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "timeoutSeconds": 5,
        "failureThreshold": failures,
    }


def model_backends(
    plan: Plan, namespace: str, deployment_name: str
) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """The Service that answers each model, and the extra Services that needs.

    An Ingress path has one backend. A model on one server routes to that server's Service. A
    model on several servers (replicas) routes to a Service of its own whose selector is the pod
    label ``m.myriad.io/<model id>`` that every server holding it carries, so the replicas share
    its load and a replica that is down drops out of its endpoints. Every pod carries a label per
    model it holds, replicated or not, so a pod template depends only on its own server (adding
    a replica elsewhere does not roll it)."""
    holders: dict[str, list[str]] = {}
    for server in plan.servers:
        for model_id in server.model_ids:
            holders.setdefault(model_id, []).append(server.id)
    backends: dict[str, str] = {}
    services: list[dict[str, Any]] = []
    for model_id in sorted(holders):
        servers = holders[model_id]
        if len(servers) == 1:
            backends[model_id] = servers[0]
            continue
        name = model_service_name(model_id)
        backends[model_id] = name
        services.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": _meta(
                    name,
                    namespace,
                    _base_labels(deployment_name, "model"),
                    {MODEL_ANNOTATION: model_id},
                ),
                "spec": {
                    "type": "ClusterIP",
                    "selector": {INSTANCE: deployment_name, model_label(model_id): "true"},
                    "ports": [
                        {
                            "name": "http",
                            "port": SERVER_PORT,
                            "targetPort": "http",
                            "protocol": "TCP",
                        }
                    ],
                },
            }
        )
    return backends, services


def ingress_shard(model_id: str, shards: int) -> int:
    return int(hashlib.sha256(model_id.encode()).hexdigest()[:8], 16) % shards


def ingresses(
    plan: Plan,
    backends: Mapping[str, str],
    namespace: str,
    deployment_name: str,
    *,
    ingress_class: str = "nginx",
    host: str | None = None,
) -> list[dict[str, Any]]:
    """Ingress objects routing ``/predictions/<model>`` and ``/v2/models/<model>`` (Prefix:
    element-wise, so it covers ``/infer``, ``/ready`` and metadata, and ``/v2/models/a`` does
    not match ``/v2/models/ab``) to the model's backend.

    ingress-nginx's strict path check refuses '.' in Exact and Prefix paths; a model id with a
    dot gets ImplementationSpecific paths, which that controller treats as a plain prefix (the
    longest match wins, so ``a.b`` and ``a.bc`` each reach their own server).

    Thousands of models make thousands of paths: they are split over ``2^k`` Ingress objects of
    about ``PATHS_PER_INGRESS`` paths each, a model's shard fixed by a hash of its id. When the
    count doubles a model moves from shard i to i + n only, so applying the shards from the last
    to the first (``apply_order``) never leaves a model without a route."""
    models = sorted(backends)
    needed = max(1, math.ceil(2 * len(models) / PATHS_PER_INGRESS))
    shards = 1 << (needed - 1).bit_length()
    paths: list[list[dict[str, Any]]] = [[] for _ in range(shards)]
    for model_id in models:
        path_type = (
            "Prefix" if _NGINX_STRICT_PATH.match(f"/{model_id}") else "ImplementationSpecific"
        )
        backend = {"service": {"name": backends[model_id], "port": {"name": "http"}}}
        bucket = paths[ingress_shard(model_id, shards)]
        for prefix in ("/predictions/", "/v2/models/"):
            bucket.append({"path": prefix + model_id, "pathType": path_type, "backend": backend})
    labels = {**_base_labels(deployment_name, "ingress"), PLAN_LABEL: _label_value(plan.plan_id)}
    result = []
    for index, shard_paths in enumerate(paths):
        rule: dict[str, Any] = {"http": {"paths": shard_paths}}
        if host:
            rule = {"host": host, **rule}
        result.append(
            {
                "apiVersion": "networking.k8s.io/v1",
                "kind": "Ingress",
                "metadata": _meta(
                    f"{deployment_name}-routes-{index:03d}",
                    namespace,
                    labels,
                    {
                        "nginx.ingress.kubernetes.io/proxy-body-size": "8m",
                        "nginx.ingress.kubernetes.io/proxy-read-timeout": "60",
                    },
                ),
                "spec": {"ingressClassName": ingress_class, "rules": [rule] if shard_paths else []},
            }
        )
    return result


# ------------------------------------------------------------------------------------ files


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:  # a shared backend dict is written out each time
        return True


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    if "\n" in value:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_Dumper.add_representer(str, _represent_str)


def to_yaml(objects: Iterable[Mapping[str, Any]]) -> str:
    """Objects as one multi-document YAML string, keys in the order rendered."""
    return "".join(
        "---\n" + yaml.dump(dict(obj), Dumper=_Dumper, sort_keys=False, width=100)
        for obj in objects
    )


def manifest_files(objects: list[dict[str, Any]]) -> dict[str, str]:
    """File name → YAML: ``plan.yaml`` (Namespace, ServiceAccount, ConfigMap, NetworkPolicy),
    ``store-secret.yaml`` (the store Secret, when rendered: it holds credentials, keep it out of
    version control), ``servers/<id>.yaml`` (a server's Deployment, Service, PDB and HPA),
    ``models.yaml`` (replicated models' Services), ``ingress.yaml``, and ``kustomization.yaml``
    listing them. A server's file depends on that server alone, so a kept server's file is
    byte-identical across plans."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for obj in objects:
        labels = obj["metadata"].get("labels", {})
        kind = obj["kind"]
        if kind in ("Namespace", "ServiceAccount", "ConfigMap", "NetworkPolicy"):
            file = "plan.yaml"
        elif kind == "Secret":
            file = "store-secret.yaml"
        elif kind == "Ingress":
            file = "ingress.yaml"
        elif labels.get(COMPONENT) == "model":
            file = "models.yaml"
        else:
            file = f"servers/{labels[SERVER_LABEL]}.yaml"
        groups.setdefault(file, []).append(obj)
    order = [f for f in ("plan.yaml", "store-secret.yaml") if f in groups]
    order += sorted(f for f in groups if f.startswith("servers/"))
    order += [f for f in ("models.yaml", "ingress.yaml") if f in groups]
    files = {file: to_yaml(groups[file]) for file in order}
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": order,
    }
    files["kustomization.yaml"] = yaml.dump(kustomization, Dumper=_Dumper, sort_keys=False)
    return files


def write_manifests(
    plan: Plan,
    out_dir: Path,
    catalog: Catalog | None = None,
    options: DeployOptions | None = None,
    images: Mapping[str, str] | None = None,
    **render_args: Any,
) -> list[Path]:
    """Render ``plan`` into ``out_dir`` (by convention ``infra/k8s/<plan-id>``), replacing what
    was there: the files are written into a temporary sibling folder and it is renamed into
    place, so a failure leaves the old folder or none, never half of one."""
    objects = render(plan, catalog, options or DeployOptions(), images, **render_args)
    return write_files(manifest_files(objects), Path(out_dir))


def write_files(files: Mapping[str, str], out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    old = None
    try:
        for name, text in files.items():
            write_atomic(temp / name, text.encode(), durable=False)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
        os.replace(temp, out_dir)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        if old is not None and old.exists() and not out_dir.exists():
            os.replace(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return [out_dir / name for name in files]


def pod_manifests(
    plan: Plan,
    server_ids: Iterable[str] | None = None,
    *,
    catalog: Catalog | None = None,
    options: DeployOptions | None = None,
    images: Mapping[str, str] | None = None,
    host_ports: Mapping[str, int] | None = None,
    mount_file_store: bool = True,
    fingerprints: Mapping[str, str] | None = None,
    host_network: bool = False,
) -> str:
    """The plan ConfigMap and the Deployments of ``server_ids`` (default: all) as one
    multi-document YAML for ``podman kube play``: namespaces and the ServiceAccount dropped,
    ``host_ports`` (server id → port) published as the container's hostPort, and a ``file://``
    store (or a plain path) mounted read-only at the same path when ``mount_file_store``.

    ``host_network``: the pods share the host's network (an S3 server on the host's loopback is
    then reachable), each server listening on its ``host_ports`` port instead of 8080.
    The store Secret is not in the output: podman 4.3 stores a played Secret in a form its own
    envFrom cannot read, so create it first (``podman secret create NAME FILE`` with the
    Secret's ``data`` as a JSON object; tests/containers.py does)."""
    options = options or DeployOptions()
    objects = render(plan, catalog, options, images, fingerprints=fingerprints, cluster_store=False)
    wanted = set(server_ids) if server_ids is not None else {s.id for s in plan.servers}
    unknown = wanted - {s.id for s in plan.servers}
    if unknown:
        raise DeployError(f"plan {plan.plan_id} has no servers {sorted(unknown)}")
    store_path = None
    if mount_file_store and options.store_uri and "://" not in options.store_uri:
        store_path = options.store_uri
    elif mount_file_store and options.store_uri and options.store_uri.startswith("file://"):
        store_path = options.store_uri[len("file://") :]
    picked = []
    for obj in objects:
        if obj["kind"] == "ConfigMap" or (
            obj["kind"] == "Deployment" and obj["metadata"]["name"] in wanted
        ):
            obj = copy_object(obj)
            obj["metadata"].pop("namespace", None)
            if obj["kind"] == "Deployment":
                pod = obj["spec"]["template"]["spec"]
                pod.pop("serviceAccountName", None)
                container = pod["containers"][0]
                port = (host_ports or {}).get(obj["metadata"]["name"])
                if host_network:
                    if port is None:
                        raise DeployError(f"host_network: no port for {obj['metadata']['name']}")
                    # podman refuses port mappings on the host's network: no ports, and the
                    # probes name the server's port by number.
                    pod["hostNetwork"] = True
                    args = container["args"]
                    args[args.index("--port") + 1] = str(port)
                    # Every pod on the host's network would take the same gRPC port: HTTP only.
                    del args[args.index("--grpc-port") : args.index("--grpc-port") + 2]
                    del container["ports"]
                    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                        container[probe]["httpGet"]["port"] = port
                else:
                    # podman publishes a containerPort that has no hostPort on the same port of
                    # the host, so every pod would take 8081: gRPC stays inside each pod.
                    container["ports"] = [p for p in container["ports"] if p["name"] != "grpc"]
                    if port is not None:
                        container["ports"][0]["hostPort"] = port
                if store_path:
                    pod["volumes"].append(
                        {"name": "store", "hostPath": {"path": store_path, "type": "Directory"}}
                    )
                    container["volumeMounts"].append(
                        {"name": "store", "mountPath": store_path, "readOnly": True}
                    )
            picked.append(obj)
    return to_yaml(picked)


def copy_object(value: Any) -> Any:
    """A deep copy of a JSON-like object (dicts and lists; leaves are shared)."""
    if isinstance(value, dict):
        return {k: copy_object(v) for k, v in value.items()}
    if isinstance(value, list):
        return [copy_object(v) for v in value]
    return value


_FIRST_KINDS = ("Namespace", "ServiceAccount", "Secret", "ConfigMap", "NetworkPolicy")


def apply_order(objects: list[dict[str, Any]]) -> tuple[list[dict], list[dict], list[dict]]:
    """Split rendered objects into what a rollout applies first (Namespace, ServiceAccount,
    store Secret, ConfigMap, NetworkPolicy: new pods read the plan and the credentials as they
    start, so they go before them), the server and
    model objects (then wait for the Deployments), and last the Ingress shards, last shard
    first (see ``ingresses``)."""
    first = [o for o in objects if o["kind"] in _FIRST_KINDS]
    routes = [o for o in objects if o["kind"] == "Ingress"]
    servers = [o for o in objects if o not in first and o not in routes]
    routes.sort(key=lambda o: o["metadata"]["name"], reverse=True)
    return first, servers, routes


# ------------------------------------------------------------------------------ orchestrator

# What a flow run does to deploy, redeploy and tear down (serving.runtimes.kubernetes): apply,
# read, list and delete these in the deployment's namespace; read pods (why a server is not
# ready). Server-side apply is a PATCH that creates what is missing, hence create and patch.
_ORCHESTRATOR_VERBS = ["get", "list", "create", "patch", "delete"]
ORCHESTRATOR_RULES: list[dict[str, list[str]]] = [
    {
        "apiGroups": [""],
        "resources": ["configmaps", "secrets", "services", "serviceaccounts"],
        "verbs": _ORCHESTRATOR_VERBS,
    },
    {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": _ORCHESTRATOR_VERBS},
    {"apiGroups": ["policy"], "resources": ["poddisruptionbudgets"], "verbs": _ORCHESTRATOR_VERBS},
    {
        "apiGroups": ["networking.k8s.io"],
        "resources": ["ingresses", "networkpolicies"],
        "verbs": _ORCHESTRATOR_VERBS,
    },
    {
        "apiGroups": ["autoscaling"],
        "resources": ["horizontalpodautoscalers"],
        "verbs": _ORCHESTRATOR_VERBS,
    },
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
]


def orchestrator_objects(
    options: DeployOptions,
    *,
    orchestrator_namespace: str = ORCHESTRATOR_NAMESPACE,
    role_arn: str | None = None,
) -> list[dict[str, Any]]:
    """What the Kubernetes work pool's flow runs need to deploy ``options``' deployment: the
    namespaces (the pool's and the deployment's, made here so the flow runs need no right to
    create namespaces; Myriad then leaves them in place at teardown), the ServiceAccount
    ``myriad-orchestrator`` in the pool's namespace (``role_arn``: its IRSA role, for the store),
    a Role on exactly the kinds a deploy applies, prunes and tears down (``ORCHESTRATOR_RULES``)
    in the deployment's namespace, bound to that ServiceAccount, and a ClusterRole to read
    that one Namespace. Applied once by a cluster admin (``kubectl apply -k``).

    Not labelled with the deployment's instance label: a teardown deletes by that label, and
    must not take the orchestrator's own account with it."""
    namespace = namespace_for(options)
    labels = {NAME: "myriad", COMPONENT: "orchestrator", PART_OF: "myriad", VERSION: _version()}
    name = ORCHESTRATOR_SERVICE_ACCOUNT
    subject = {"kind": "ServiceAccount", "name": name, "namespace": orchestrator_namespace}
    objects: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": _meta(ns, None, labels)}
        for ns in dict.fromkeys([orchestrator_namespace, namespace])
    ]
    annotations = {"eks.amazonaws.com/role-arn": role_arn} if role_arn else None
    objects.append(
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": _meta(name, orchestrator_namespace, labels, annotations),
            "automountServiceAccountToken": True,  # it calls the Kubernetes API
        }
    )
    objects.append(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": _meta(name, namespace, labels),
            "rules": [dict(rule) for rule in ORCHESTRATOR_RULES],
        }
    )
    objects.append(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": _meta(name, namespace, labels),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [subject],
        }
    )
    cluster_name = f"{name}-{namespace}"
    objects.append(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": _meta(cluster_name, None, labels),
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["namespaces"],
                    "resourceNames": [namespace],
                    "verbs": ["get"],
                }
            ],
        }
    )
    objects.append(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": _meta(cluster_name, None, labels),
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": cluster_name,
            },
            "subjects": [subject],
        }
    )
    return objects


def orchestrator_files(objects: list[dict[str, Any]]) -> dict[str, str]:
    """``orchestrator.yaml`` and the ``kustomization.yaml`` listing it, for ``write_files``."""
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": ["orchestrator.yaml"],
    }
    return {
        "orchestrator.yaml": to_yaml(objects),
        "kustomization.yaml": yaml.dump(kustomization, Dumper=_Dumper, sort_keys=False),
    }
