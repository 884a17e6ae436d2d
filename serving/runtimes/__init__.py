"""Runtimes: where a plan's servers run. One interface (``Runtime``: deploy, status,
redeploy, teardown), one module per runtime, the same plan and the same server everywhere."""

from __future__ import annotations

from serving.deployments import DeployError, deployment_path, read_deployment
from serving.runtimes.base import DeployOptions, RedeployResult, Runtime, ServerStatus

RUNTIMES = ("local", "docker", "kubernetes")


def get_runtime(name: str, **settings: object) -> Runtime:
    """The runtime called ``name``; ``settings`` go to the Kubernetes runtime (catalog,
    kubeconfig, context, render options)."""
    if name == "local":
        from serving.runtimes.local import LocalRuntime

        return LocalRuntime()
    if name == "docker":
        from serving.runtimes.docker import DockerRuntime

        return DockerRuntime()
    if name == "kubernetes":
        from serving.runtimes.kubernetes import KubernetesRuntime

        return KubernetesRuntime(**settings)
    raise DeployError(f"unknown runtime {name!r}; choose one of {', '.join(RUNTIMES)}")


__all__ = [
    "RUNTIMES",
    "DeployError",
    "DeployOptions",
    "RedeployResult",
    "Runtime",
    "ServerStatus",
    "deployment_path",
    "get_runtime",
    "read_deployment",
]
