"""Build one image per processor, or record the environment when servers run as local processes."""

from __future__ import annotations

import hashlib
import logging
import platform
from importlib import metadata

from prefect import get_run_logger, task
from prefect.exceptions import MissingContextError

from serving.build.images import BuildError, NoEngine, dockerfile_for, push_image
from serving.build.images import build_image as build_server_image
from serving.build.record import write_build_record
from tasks.policy import network_retries

__all__ = ["BuildError", "build_image", "dockerfile_for", "environment_digest"]


def environment_digest() -> str:
    """sha256 over the interpreter and every installed distribution: what local servers run."""
    dists = sorted(f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions())
    text = "\n".join([platform.python_version(), platform.machine(), *dists])
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:  # called outside a flow (tests, scripts)
        return logging.getLogger("myriad.build")


@task(name="build-image", persist_result=True, **network_retries())
def build_image(processor: str, runtime: str = "local", registry: str | None = None) -> dict:
    """Local servers run in this environment, so its digest stands in for an image digest;
    container runtimes get the processor's image (pushed to ``registry`` when one is given).
    Without a docker or podman engine the image is None, said in one line."""
    if runtime == "local":
        return {
            "processor": processor,
            "runtime": runtime,
            "image": None,
            "digest": environment_digest(),
        }
    try:
        result = build_server_image(processor, registry=registry)
    except NoEngine:
        _logger().warning("no docker or podman engine answers: image for %s not built", processor)
        return {"processor": processor, "runtime": runtime, "image": None, "digest": None}
    if registry:
        result = push_image(result, registry)
    write_build_record(result, registry)
    return {
        "processor": processor,
        "runtime": runtime,
        "image": result.image,
        "digest": result.digest,
        "content_hash": result.content_hash,
        "pushed": result.pushed,
    }
