"""Build: Dockerfiles lint clean, local builds record the environment, and image builds say
clearly when no Docker engine answers."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.build import BuildError, build_image, docker_build, dockerfile_for, environment_digest

ROOT = Path(__file__).resolve().parent.parent
HADOLINT = Path(sys.executable).parent / "hadolint"


@pytest.mark.parametrize("processor", ["cpu", "gpu", "inf"])
def test_dockerfiles_lint_clean(processor: str) -> None:
    result = subprocess.run(
        [
            str(HADOLINT),
            "--no-color",
            "--failure-threshold",
            "info",
            str(dockerfile_for(processor)),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_local_build_records_the_environment_digest() -> None:
    result = build_image.fn("cpu", "local")
    assert result["image"] is None
    assert result["digest"] == environment_digest()
    assert result["digest"].startswith("sha256:") and len(result["digest"]) == 71


def test_unknown_processor_has_no_dockerfile() -> None:
    with pytest.raises(BuildError, match="no Dockerfile for processor 'tpu'"):
        dockerfile_for("tpu")


@pytest.mark.skipif(
    shutil.which("docker") is not None
    and subprocess.run(["docker", "info"], capture_output=True).returncode == 0,
    reason="a Docker engine answers here",
)
def test_image_build_without_engine_says_so() -> None:
    with pytest.raises(BuildError, match="docker"):
        docker_build("cpu", "myriad/server-cpu:test")
