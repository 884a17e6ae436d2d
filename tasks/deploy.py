"""Thin Prefect tasks over the runtimes (``serving.runtimes``): deploy, redeploy, teardown."""

from __future__ import annotations

from pathlib import Path

import msgspec
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.task_runners import ThreadPoolTaskRunner

from packing.contracts import Catalog, Plan, PlannedServer
from packing.io import load, save
from serving.deployments import Deployment, deployments_dir
from serving.runtimes import (
    RUNTIMES,
    DeployError,
    DeployOptions,
    RedeployResult,
    deployment_path,
    get_runtime,
    read_deployment,
)
from serving.runtimes.base import HostRuntime, StartEach, deploy_options
from tasks.documents import open_plan
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
    options: DeployOptions | None = None,
) -> Deployment:
    """``catalog``: the instance types, so Kubernetes servers get requests and limits sized to
    their node (ignored by the other runtimes). ``images`` per processor, else the tags
    ``myriad build`` gives (under ``registry``). ``options``: all of these as one struct
    (with the Kubernetes store access too), instead of the arguments before it."""
    options = options or deploy_options(name, store_uri, engine, images, registry)
    settings = {"catalog": catalog} if runtime == "kubernetes" else {}
    return get_runtime(runtime, **settings).deploy(load(plan_path, Plan), plan_path, options)


def redeploy(
    plan_path: Path,
    store_uri: str | None,
    name: str = "local",
    engine: str | None = None,
    images: dict[str, str] | None = None,
    registry: str | None = None,
    options: DeployOptions | None = None,
) -> RedeployResult:
    """Move the running deployment ``name`` to the plan at ``plan_path``, in its own runtime
    (its record from ``store_uri`` when the store holds it, else from this machine)."""
    running = read_deployment(name, store_uri)
    options = options or deploy_options(name, store_uri, engine, images, registry)
    return get_runtime(running.runtime).redeploy(running, load(plan_path, Plan), plan_path, options)


def teardown(name: str = "local", store_uri: str | None = None) -> list[str]:
    """Stop the servers of deployment ``name``; returns the server ids it stopped."""
    running = read_deployment(name, store_uri)
    return get_runtime(running.runtime).teardown(running)


@task(name="teardown-servers", cache_policy=NO_CACHE)
def teardown_servers(name: str) -> list[str]:
    return teardown(name)


def _local_plan(plan_uri: str, name: str) -> Path:
    """A local copy of the plan at ``plan_uri`` (file or s3://) for the runtime to read."""
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
    """Deploy the plan at ``plan_uri`` in one step; returns the deployment record."""
    plan_path = _local_plan(plan_uri, name)
    return msgspec.to_builtins(deploy(plan_path, store_uri, runtime, name, engine, images))


@task(name="deploy-server", **PERSISTED, task_run_name="deploy-server-{server_id}")
def deploy_server(plan_file: str, server_id: str, runtime: str, options: dict) -> list[str]:
    """Start one server of the plan and wait until its models are loaded (not retried: a
    server that cannot load fails the same way again). Returns [URL, handle]."""
    plan = load(Path(plan_file), Plan)
    server = next(s for s in plan.servers if s.id == server_id)
    host = get_runtime(runtime)
    url, handle = host.start_ready(server, Path(plan_file), msgspec.convert(options, DeployOptions))
    return [url, handle]


def _task_run_per_server(runtime: str) -> StartEach:
    """The runtime's ``start_each`` as one ``deploy-server-<id>`` task run per server:
    concurrent on the flow's thread pool; in turn under another task runner (Dask would start
    them on its workers' machines, not on this one, where local and docker servers must run)."""

    def start_each(
        servers: list[PlannedServer], plan_file: Path, options: DeployOptions
    ) -> list[tuple[str, str] | BaseException]:
        settings = msgspec.to_builtins(options)
        arguments = [(str(plan_file), s.id, runtime, settings) for s in servers]
        context = FlowRunContext.get()
        if context is not None and isinstance(context.task_runner, ThreadPoolTaskRunner):
            futures = [deploy_server.submit(*a) for a in arguments]
            for future in futures:
                future.wait()
            states = [future.state for future in futures]
        else:
            states = [deploy_server(*a, return_state=True) for a in arguments]
        outcomes: list[tuple[str, str] | BaseException] = []
        for state in states:
            if state.is_completed():
                url, handle = state.result()
                outcomes.append((url, handle))
            else:
                outcomes.append(DeployError(state.message or "failed"))
        return outcomes

    return start_each


def deploy_servers(
    plan_uri: str,
    store_uri: str | None,
    runtime: str,
    name: str,
    engine: str | None = None,
    images: dict[str, str] | None = None,
) -> dict:
    """Deploy the plan at ``plan_uri`` with one task run per server (``deploy-server-<id>``)
    where the runtime starts servers one by one (local, docker); Kubernetes converges the whole
    plan in one apply, so it stays one task run. The runtime stops what started if a server
    fails. Call from a flow; returns the deployment record."""
    host = get_runtime(runtime)
    if not isinstance(host, HostRuntime):
        return deploy_plan(plan_uri, store_uri, runtime, name, engine, images)
    plan = open_plan(plan_uri)
    options = deploy_options(name, store_uri, engine, images)
    # The runtime writes the copy its servers read (``begin``); no other local copy is needed.
    deployment = host.deploy(plan, Path(), options, start_each=_task_run_per_server(runtime))
    return msgspec.to_builtins(deployment)


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
