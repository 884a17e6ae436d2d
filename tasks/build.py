"""Build one image per processor, or record the environment when servers run as local processes."""

from __future__ import annotations

import hashlib
import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

from prefect import task

from tasks.paths import REPO_ROOT


class BuildError(RuntimeError):
    pass


def environment_digest() -> str:
    """sha256 over the interpreter and every installed distribution: what local servers run."""
    dists = sorted(f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions())
    text = "\n".join([platform.python_version(), platform.machine(), *dists])
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def dockerfile_for(processor: str) -> Path:
    path = REPO_ROOT / "Dockerfiles" / f"{processor}.Dockerfile"
    if not path.is_file():
        raise BuildError(f"no Dockerfile for processor {processor!r}: {path} is missing")
    return path


def docker_build(processor: str, tag: str) -> str:
    dockerfile = dockerfile_for(processor)
    docker = shutil.which("docker")
    if docker is None:
        raise BuildError("runtime needs images, but the docker command is not installed")
    probe = subprocess.run([docker, "info"], capture_output=True, text=True)
    if probe.returncode != 0:
        raise BuildError(
            "runtime needs images, but no Docker engine answers (docker info: "
            f"{probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else 'failed'})"
        )
    subprocess.run([docker, "build", "-f", str(dockerfile), "-t", tag, str(REPO_ROOT)], check=True)
    inspect = subprocess.run(
        [docker, "image", "inspect", "--format", "{{.Id}}", tag],
        capture_output=True,
        text=True,
        check=True,
    )
    return inspect.stdout.strip()


@task(name="build-image", retries=1, retry_delay_seconds=5)
def build_image(processor: str, runtime: str = "local", registry: str = "myriad") -> dict:
    """Local servers run in this environment, so its digest stands in for an image digest."""
    if runtime == "local":
        return {
            "processor": processor,
            "runtime": runtime,
            "image": None,
            "digest": environment_digest(),
        }
    tag = f"{registry}/server-{processor}:latest"
    return {
        "processor": processor,
        "runtime": runtime,
        "image": tag,
        "digest": docker_build(processor, tag),
    }
