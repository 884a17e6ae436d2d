"""Thin Prefect tasks over the runtimes (``serving.runtimes``): deploy, redeploy, teardown."""

from __future__ import annotations

from pathlib import Path

import msgspec
from prefect import task
from prefect.cache_policies import NO_CACHE

from packing.contracts import Catalog, Plan
from packing.io import load, save
from serving.routing.client import Deployment
from serving.runtimes import (
    RUNTIMES,
    DeployError,
    DeployOptions,
    RedeployResult,
    deployment_path,
    get_runtime,
    read_deployment,
)
from serving.runtimes.base import deployments_dir
from tasks.policy import PERSISTED, network_retries

__all__ = ["RUNTIMES", "DeployError", "deploy", "deployment_path", "read_deployment"]


def deploy(
    plan_path: Path,
    store_uri: str | None,
    runtime: str = "local",
    name: str = "local",
    engine: str | None = None,
    images: dict[str, str] | None = None,
    catalog: Catalog | None = None,
    registry: str | None = None,
) -> Deployment:
    """``catalog``: the instance types, so Kubernetes servers get requests and limits sized to
    their node (ignored by the other runtimes). ``images`` per processor, else the tags
    ``myriad build`` gives (under ``registry``)."""
    options = DeployOptions(
        name=name, store_uri=store_uri, engine=engine, images=images or {}, registry=registry
    )
    settings = {"catalog": catalog} if runtime == "kubernetes" else {}
    return get_runtime(runtime, **settings).deploy(load(plan_path, Plan), plan_path, options)


def redeploy(
    plan_path: Path,
    store_uri: str | None,
    name: str = "local",
    engine: str | None = None,
    images: dict[str, str] | None = None,
    registry: str | None = None,
) -> RedeployResult:
    """Move the running deployment ``name`` to the plan at ``plan_path``, in its own runtime
    (its record from ``store_uri`` when the store holds it, else from this machine)."""
    running = read_deployment(name, store_uri)
    options = DeployOptions(
        name=name, store_uri=store_uri, engine=engine, images=images or {}, registry=registry
    )
    return get_runtime(running.runtime).redeploy(running, load(plan_path, Plan), plan_path, options)


def teardown(name: str = "local", store_uri: str | None = None) -> list[str]:
    """Stop the servers of deployment ``name``; returns the server ids it stopped."""
    running = read_deployment(name, store_uri)
    return get_runtime(running.runtime).teardown(running)


def _plan_file(plan_json: str, name: str) -> Path:
    plan = msgspec.json.decode(plan_json, type=Plan)
    return save(plan, deployments_dir() / f"{name}.{plan.plan_id}.plan.json")


@task(name="deploy-servers", cache_policy=NO_CACHE)
def deploy_servers(
    plan_json: str,
    store_uri: str | None,
    runtime: str,
    name: str,
    engine: str | None = None,
    images: dict[str, str] | None = None,
) -> dict:
    plan_path = _plan_file(plan_json, name)
    return msgspec.to_builtins(deploy(plan_path, store_uri, runtime, name, engine, images))


@task(name="teardown-servers", cache_policy=NO_CACHE)
def teardown_servers(name: str) -> list[str]:
    return teardown(name)


def _local_plan(plan_uri: str, name: str) -> Path:
    """A local copy of the plan at ``plan_uri`` (file or s3://) for the runtime to read."""
    from tasks.documents import open_plan

    plan = open_plan(plan_uri)
    return save(plan, deployments_dir() / f"{name}.{plan.plan_id}.plan.json")


@task(
    name="deploy-plan",
    **PERSISTED,
    task_run_name="deploy-{name}-{runtime}",
    # Only network errors retry: a server that cannot load its models (DeployError) fails
    # the same way every time.
    **network_retries(),
)
def deploy_plan(
    plan_uri: str,
    store_uri: str | None,
    runtime: str,
    name: str,
    engine: str | None = None,
    images: dict[str, str] | None = None,
) -> dict:
    """Deploy the plan at ``plan_uri``; returns the deployment record (server URLs, handles)."""
    plan_path = _local_plan(plan_uri, name)
    return msgspec.to_builtins(deploy(plan_path, store_uri, runtime, name, engine, images))


@task(
    name="redeploy-servers",
    **PERSISTED,
    task_run_name="redeploy-{name}",
    **network_retries(),
)
def redeploy_servers(
    plan_uri: str,
    store_uri: str | None,
    name: str,
    engine: str | None = None,
    images: dict[str, str] | None = None,
) -> dict:
    """Move deployment ``name`` to the plan at ``plan_uri``: only servers whose fingerprint
    changed are replaced, each new one ready before an old one stops."""
    result = redeploy(_local_plan(plan_uri, name), store_uri, name, engine, images)
    return {
        "plan_id": result.deployment.plan_id,
        "kept": result.kept,
        "started": result.started,
        "stopped": result.stopped,
        "handles": dict(result.deployment.handles),
    }


@task(name="read-deployment", **PERSISTED, **network_retries())
def deployment_record(name: str, store_uri: str | None = None) -> dict:
    return msgspec.to_builtins(read_deployment(name, store_uri))
