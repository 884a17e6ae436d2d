"""An eksctl cluster config for a plan: one managed node group per instance family the plan
uses, labelled and tainted as ``serving.runtimes.manifests`` renders for, plus the add-ons.

eksctl installs the NVIDIA and Neuron device plugins itself when a node group has GPU or
Inferentia instance types (its ``--install-nvidia-plugin`` / ``--install-neuron-plugin`` flags
default to true). metrics-server and the VPC CNI, CoreDNS and kube-proxy are EKS add-ons in the
config. cluster-autoscaler, the AWS Load Balancer Controller and ingress-nginx are Helm charts:
``addons_script`` writes their commands; their IAM roles (IRSA) are in the config.

The servers' IAM service account is bound to ``manifests.namespace_for(options)`` and
``manifests.server_service_account(options)``, the orchestrator's to the work pool's namespace
and ServiceAccount: the same functions and constants the manifests use, so a deploy with the
same ``DeployOptions`` runs as the account the role trusts. ``write_cluster_files`` writes the
config, the add-ons script and the orchestrator's RBAC for one deployment.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from packing.contracts import Catalog, Plan
from serving.runtimes.base import DeployOptions
from serving.runtimes.manifests import (
    ORCHESTRATOR_NAMESPACE,
    ORCHESTRATOR_SERVICE_ACCOUNT,
    PROCESSOR_LABEL,
    namespace_for,
    orchestrator_files,
    orchestrator_objects,
    server_service_account,
    write_files,
)

KUBERNETES_VERSION = "1.33"
SYSTEM_INSTANCE_TYPE = "m6i.large"
S3_READ_ONLY = "arn:aws:iam::aws:policy/AmazonS3ReadOnlyAccess"
# The orchestrator writes the store (traced artifacts, plans, deployment records): replace with
# a policy limited to the store's bucket where the account holds other buckets.
S3_FULL = "arn:aws:iam::aws:policy/AmazonS3FullAccess"


def server_role_name(cluster_name: str, options: DeployOptions) -> str:
    """The IAM role the config makes for the servers of ``options``' deployment; give its ARN
    as ``DeployOptions.role_arn`` (``myriad deploy --role-arn``)."""
    return f"{cluster_name}-{namespace_for(options)}-server"[:64]


def orchestrator_role_name(cluster_name: str) -> str:
    """The IAM role of the orchestrator's ServiceAccount (the work pool's flow runs)."""
    return f"{cluster_name}-myriad-orchestrator"[:64]


def role_arn(account_id: str, role_name: str) -> str:
    return f"arn:aws:iam::{account_id}:role/{role_name}"


def node_groups(plan: Plan, catalog: Catalog) -> list[dict[str, Any]]:
    """One managed node group per instance family of the plan, sized by its instance count.

    minSize and desiredCapacity are the plan's count of that family, maxSize one more node
    per ten (at least one): a rolling update starts the new pod of a server before the old one
    stops (maxSurge 1), and an accelerator server needs a free device for it, so the
    cluster autoscaler may add a node for the surge and removes it once idle.

    A group with several instance types of one family (as the design asks) leaves the choice
    of type to EC2; the servers' node selectors then keep each pod on its own type, and the
    autoscaler adds nodes by the group's first type. Plans that mix sizes of one family place
    best with one group per type; split the group by hand if the autoscaler picks badly."""
    by_family: dict[str, list[str]] = {}
    counts: Counter[str] = Counter()
    processors: dict[str, str] = {}
    for instance in plan.instances:
        instance_type = catalog.get(instance.type)
        family = instance_type.family
        if instance.type not in by_family.setdefault(family, []):
            by_family[family].append(instance.type)
        counts[family] += 1
        processors[family] = instance_type.processor
    groups = []
    for family in sorted(by_family):
        processor = processors[family]
        count = counts[family]
        labels = {PROCESSOR_LABEL: processor, "myriad.io/family": family}
        taint = {"key": PROCESSOR_LABEL, "value": processor, "effect": "NoSchedule"}
        group: dict[str, Any] = {
            "name": f"servers-{family}",
            "instanceTypes": sorted(by_family[family]),
            "amiFamily": "AmazonLinux2023",
            "minSize": count,
            "desiredCapacity": count,
            "maxSize": count + max(1, count // 10),
            "volumeSize": 100 if processor == "cpu" else 200,
            "privateNetworking": True,
            "labels": labels,
            "taints": [taint],
            # The autoscaler scales a group up from zero only if it knows its labels and taints.
            "propagateASGTags": True,
            "tags": {
                f"k8s.io/cluster-autoscaler/node-template/label/{PROCESSOR_LABEL}": processor,
                f"k8s.io/cluster-autoscaler/node-template/taint/{PROCESSOR_LABEL}": (
                    f"{processor}:NoSchedule"
                ),
            },
        }
        groups.append(group)
    return groups


def cluster_config(
    plan: Plan,
    catalog: Catalog,
    cluster_name: str,
    region: str,
    *,
    options: DeployOptions,
    kubernetes_version: str = KUBERNETES_VERSION,
    store_policy_arns: list[str] | None = None,
    orchestrator_policy_arns: list[str] | None = None,
) -> dict[str, Any]:
    """An eksctl ``ClusterConfig`` (eksctl.io/v1alpha5) for ``plan`` deployed with ``options``:
    IAM OIDC, IRSA roles for the add-ons, for the servers (S3 read access to the store, bound
    to the deployment's namespace and server ServiceAccount; role only: the manifests make the
    ServiceAccount, annotated with ``options.role_arn``) and for the orchestrator (S3 access
    for the flow runs), a small system node group for the add-ons, one server node group per
    instance family, and the EKS add-ons."""
    server_account = {
        "name": server_service_account(options),
        "namespace": namespace_for(options),
    }
    orchestrator_account = {
        "name": ORCHESTRATOR_SERVICE_ACCOUNT,
        "namespace": ORCHESTRATOR_NAMESPACE,
    }
    return {
        "apiVersion": "eksctl.io/v1alpha5",
        "kind": "ClusterConfig",
        "metadata": {
            "name": cluster_name,
            "region": region,
            "version": kubernetes_version,
            "tags": {"app.kubernetes.io/part-of": "myriad", "myriad.io/plan": plan.plan_id},
        },
        "iam": {
            "withOIDC": True,
            "serviceAccounts": [
                {
                    "metadata": {"name": "cluster-autoscaler", "namespace": "kube-system"},
                    "wellKnownPolicies": {"autoScaler": True},
                },
                {
                    "metadata": {
                        "name": "aws-load-balancer-controller",
                        "namespace": "kube-system",
                    },
                    "wellKnownPolicies": {"awsLoadBalancerController": True},
                },
                {
                    "metadata": server_account,
                    "roleName": server_role_name(cluster_name, options),
                    "roleOnly": True,
                    "attachPolicyARNs": list(store_policy_arns or [S3_READ_ONLY]),
                },
                {
                    "metadata": orchestrator_account,
                    "roleName": orchestrator_role_name(cluster_name),
                    "roleOnly": True,
                    "attachPolicyARNs": list(orchestrator_policy_arns or [S3_FULL]),
                },
            ],
        },
        "addons": [
            {
                "name": "vpc-cni",
                "attachPolicyARNs": ["arn:aws:iam::aws:policy/AmazonEKS_CNI_Policy"],
                # The servers' NetworkPolicy is enforced only with the CNI's policy agent on.
                "configurationValues": '{"enableNetworkPolicy": "true"}',
            },
            {"name": "coredns"},
            {"name": "kube-proxy"},
            {"name": "metrics-server"},
        ],
        "managedNodeGroups": [
            {
                "name": "system",
                "instanceTypes": [SYSTEM_INSTANCE_TYPE],
                "amiFamily": "AmazonLinux2023",
                "minSize": 2,
                "desiredCapacity": 2,
                "maxSize": 3,
                "privateNetworking": True,
                "labels": {"myriad.io/role": "system"},
            },
            *node_groups(plan, catalog),
        ],
    }


def to_yaml(config: dict[str, Any], plan: Plan) -> str:
    header = (
        f"# eksctl cluster config for plan {plan.plan_id}, generated by "
        "serving.runtimes.eks.cluster_config; do not edit by hand.\n"
        "# eksctl create cluster -f <this file>; then the add-ons (addons.sh beside it).\n"
    )
    return header + yaml.safe_dump(config, sort_keys=False, width=100)


def addons_script(cluster_name: str, region: str) -> str:
    """The Helm charts eksctl does not install: cluster-autoscaler, the AWS Load Balancer
    Controller, ingress-nginx behind an NLB; their service accounts come from the config."""
    return f"""#!/usr/bin/env bash
# Add-ons for the EKS cluster {cluster_name} ({region}) that eksctl does not install.
# Generated by serving.runtimes.eks.addons_script. eksctl already installed the NVIDIA and
# Neuron device plugins (GPU and Inferentia node groups) and the EKS add-ons in the config.
set -euo pipefail
CLUSTER={cluster_name}
REGION={region}
# ingress-nginx's Service becomes an NLB through the AWS Load Balancer Controller.
LB='controller.service.annotations.service\\.beta\\.kubernetes\\.io/aws-load-balancer'
helm repo add autoscaler https://kubernetes.github.io/autoscaler
helm repo add eks https://aws.github.io/eks-charts
helm repo add ingress-nginx https://kubernetes.github.io/ingress-nginx
helm repo update
helm upgrade --install cluster-autoscaler autoscaler/cluster-autoscaler \\
  --namespace kube-system \\
  --set autoDiscovery.clusterName="$CLUSTER" --set awsRegion="$REGION" \\
  --set rbac.serviceAccount.create=false --set rbac.serviceAccount.name=cluster-autoscaler \\
  --set extraArgs.balance-similar-node-groups=true --set extraArgs.expander=least-waste \\
  --set nodeSelector.myriad\\.io/role=system
helm upgrade --install aws-load-balancer-controller eks/aws-load-balancer-controller \\
  --namespace kube-system \\
  --set clusterName="$CLUSTER" --set region="$REGION" \\
  --set serviceAccount.create=false --set serviceAccount.name=aws-load-balancer-controller \\
  --set nodeSelector.myriad\\.io/role=system
helm upgrade --install ingress-nginx ingress-nginx/ingress-nginx \\
  --namespace ingress-nginx --create-namespace \\
  --set controller.ingressClassResource.name=nginx \\
  --set controller.nodeSelector.myriad\\.io/role=system \\
  --set controller.replicaCount=2 \\
  --set-string "$LB-type=external" \\
  --set-string "$LB-nlb-target-type=ip" \\
  --set-string "$LB-scheme=internet-facing"
kubectl -n ingress-nginx rollout status deployment/ingress-nginx-controller --timeout=5m
"""


def write_cluster_files(
    plan: Plan,
    catalog: Catalog,
    cluster_name: str,
    region: str,
    options: DeployOptions,
    out_dir: Path,
    *,
    account_id: str | None = None,
) -> list[Path]:
    """For the deployment ``options`` of ``plan`` on a new cluster: ``eks-cluster.yaml``,
    ``addons.sh`` and ``orchestrator/`` (the work pool's RBAC, its ServiceAccount annotated
    with the orchestrator role's ARN when ``account_id`` is given) in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = cluster_config(plan, catalog, cluster_name, region, options=options)
    paths = [out_dir / "eks-cluster.yaml", out_dir / "addons.sh"]
    paths[0].write_text(to_yaml(config, plan))
    paths[1].write_text(addons_script(cluster_name, region))
    paths[1].chmod(0o755)
    arn = role_arn(account_id, orchestrator_role_name(cluster_name)) if account_id else None
    objects = orchestrator_objects(options, role_arn=arn)
    return paths + write_files(orchestrator_files(objects), out_dir / "orchestrator")
