"""Thin Prefect tasks over the runtimes (``serving.runtimes``): deploy, redeploy, teardown."""

from __future__ import annotations

from pathlib import Path

import msgspec
from prefect import task
from prefect.cache_policies import NO_CACHE

from packing.contracts import Catalog, Plan
from packing.io import load, save
from serving.client import Deployment
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
    """Move the running deployment ``name`` to the plan at ``plan_path``, in its own runtime."""
    running = read_deployment(name)
    options = DeployOptions(
        name=name, store_uri=store_uri, engine=engine, images=images or {}, registry=registry
    )
    return get_runtime(running.runtime).redeploy(running, load(plan_path, Plan), plan_path, options)


def teardown(name: str = "local") -> list[str]:
    """Stop the servers of deployment ``name``; returns the server ids it stopped."""
    running = read_deployment(name)
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
