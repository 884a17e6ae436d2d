"""The deployment record: where the servers of a plan answer and what a runtime started for
each, kept in the data directory (``deployments/<name>.json``, which a gateway follows) and,
when the deployment has a store, there too with a copy of its plan. Runtimes write it; the
gateway, the client and the load tester read it; this is its one home."""

from __future__ import annotations

from pathlib import Path

import msgspec

from packing.contracts import Plan
from packing.errors import MyriadError
from packing.io import load, write_atomic
from serving.store import (
    data_dir,
    deployment_key,
    deployment_plan_key,
    deployment_prefix,
    open_store,
)


class DeployError(MyriadError, RuntimeError):
    """A deployment step failed; the message names the server and what went wrong."""


class NoDeployment(DeployError):
    """No record of a deployment by that name: nothing is running under it."""


class Deployment(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Where the servers of a plan answer: one base URL per plan server id."""

    schema_version: int = 2
    name: str
    plan_id: str
    runtime: str
    servers: dict[str, str]
    # What the runtime started per server, so teardown stops exactly that: a supervisor's
    # process id (local), a container name (docker), a Kubernetes Deployment (kubernetes).
    handles: dict[str, str] = {}
    # Content hash per server (serving.runtimes.base.server_fingerprint): a redeploy keeps a
    # running server whose fingerprint the new plan has too.
    fingerprints: dict[str, str] = {}
    # The plan file the servers were started from, so a gateway can follow a redeploy.
    plan_path: str | None = None
    namespace: str | None = None
    # The store the servers load from; the record and a copy of its plan are kept there too
    # (``plan_uri``), so a redeploy run on another machine (a Kubernetes work pool's job) finds
    # the running deployment.
    store_uri: str | None = None
    plan_uri: str | None = None


def deployments_dir() -> Path:
    path = data_dir() / "deployments"
    path.mkdir(parents=True, exist_ok=True)
    return path


def deployment_path(name: str) -> Path:
    return deployments_dir() / f"{name}.json"


def read_deployment(name: str, store_uri: str | None = None) -> Deployment:
    """The record of deployment ``name``: from ``store_uri`` when given and it holds one (the
    newest wherever the last deploy ran), else from this machine's deployments folder."""
    path = deployment_path(name)
    if store_uri is not None:
        store = open_store(store_uri)
        if store.exists(deployment_key(name)):
            return msgspec.json.decode(store.get_bytes(deployment_key(name)), type=Deployment)
    if not path.is_file():
        where = f"{path} does not exist" + (
            f" and {store_uri} has no {deployment_key(name)}" if store_uri else ""
        )
        raise NoDeployment(f"no deployment named {name!r} ({where})")
    return load(path, Deployment)


def write_deployment(deployment: Deployment, plan: Plan | None = None) -> Deployment:
    """Write the record here (the gateway follows this file) and, when the deployment has a
    store, there with a copy of ``plan``, which the record then names by ``plan_uri``.
    Returns the record as written."""
    if deployment.store_uri is not None:
        store = open_store(deployment.store_uri)
        if plan is not None:
            key = deployment_plan_key(deployment.name, plan.plan_id)
            store.put_bytes(key, msgspec.json.encode(plan))
            deployment = msgspec.structs.replace(deployment, plan_uri=store.url_for(key))
        store.put_bytes(deployment_key(deployment.name), msgspec.json.encode(deployment))
    write_atomic(deployment_path(deployment.name), msgspec.json.encode(deployment))
    write_targets(deployment)
    return deployment


def forget_deployment(deployment: Deployment) -> None:
    """Remove the record of a torn-down deployment, here and in its store."""
    deployment_path(deployment.name).unlink(missing_ok=True)
    targets_path(deployment.name).unlink(missing_ok=True)
    if deployment.store_uri is not None:
        store = open_store(deployment.store_uri)
        if store.exists(deployment_key(deployment.name)):
            store.delete(deployment_key(deployment.name))
        store.delete_prefix(deployment_prefix(deployment.name))


# ----------------------------------------------------------------------------- scrape targets
# The runtimes that serve on this machine's addresses (local, docker) have their servers
# published as Prometheus file_sd targets, <home>/prometheus/<deployment>.json, labelled
# myriad_deployment and myriad_server, rewritten with the record: a Prometheus with
# file_sd_configs over that folder follows deploys, redeploys and teardowns.


def targets_path(name: str, home: Path | None = None) -> Path:
    return (home or data_dir()) / "prometheus" / f"{name}.json"


def scrape_targets(deployment: Deployment) -> list[dict]:
    """The ``file_sd`` entries of a deployment's servers: one per server, labelled by the
    deployment and the plan's server id."""
    return [
        {
            "targets": [url.split("://", 1)[-1].rstrip("/")],
            "labels": {
                "myriad_deployment": deployment.name,
                "myriad_server": server_id,
                "myriad_runtime": deployment.runtime,
            },
        }
        for server_id, url in sorted(deployment.servers.items())
    ]


def write_targets(deployment: Deployment) -> Path | None:
    """Publish the servers as Prometheus targets (not for Kubernetes: a cluster's Prometheus
    finds the pods by their annotations)."""
    if deployment.runtime == "kubernetes":
        return None
    path = targets_path(deployment.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, msgspec.json.encode(scrape_targets(deployment)))
    return path
