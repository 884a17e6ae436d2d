"""Thin Prefect tasks over :mod:`serving.observe` and :mod:`serving.rebalance`: observe a
deployment's traffic into the store, check it for drift, plan and apply a rebalance."""

from __future__ import annotations

import msgspec
from prefect import task
from prefect.cache_policies import NO_CACHE

from serving.deployments import read_deployment
from serving.observe import observe_deployment, publish_observation
from tasks.policy import PERSISTED, network_retries


@task(name="observe-traffic", **PERSISTED, task_run_name="observe-{name}", **network_retries())
def observe_traffic(
    name: str,
    store_uri: str | None,
    window_s: float,
    interval_s: float,
    quantile: float,
    prometheus_url: str | None,
) -> dict:
    """Observe deployment ``name`` and keep the observation in its store; returns the
    observation's URI and its figures (small: rates per model)."""
    deployment = read_deployment(name, store_uri)
    observation = observe_deployment(deployment, window_s, interval_s, quantile, prometheus_url)
    uri = publish_observation(observation, store_uri or deployment.store_uri)
    return {"observation_uri": uri, "observation": msgspec.to_builtins(observation)}


@task(name="emit-drift", cache_policy=NO_CACHE)
def emit_drift(name: str, drift: dict) -> str | None:
    """A ``myriad.traffic.drifted`` event whose resource is the deployment: a trigger bound to
    one deployment's resource id cannot be set off by another deployment's drift."""
    from prefect.events import emit_event

    event = emit_event(
        event="myriad.traffic.drifted",
        resource={
            "prefect.resource.id": f"myriad.deployment.{name}",
            "prefect.resource.name": name,
            "myriad.deployment": name,
        },
        payload=drift,
    )
    return str(event.id) if event is not None else None
