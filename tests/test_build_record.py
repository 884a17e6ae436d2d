"""The build record: what ``myriad build`` built is found by later commands without the
build's settings, pinned by digest once pushed, and ignored once the sources change."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from packing.io import save
from serving.build.images import BuildResult, content_hash, image_tag
from serving.build.record import read_build_record, write_build_record
from serving.runtimes import DeployOptions
from serving.runtimes.base import image_for
from serving.runtimes.local import free_port
from serving.settings import VARIABLES
from tests.containers import build_env
from tests.servers import one_server_plan

ROOT = Path(__file__).resolve().parent.parent
DIGEST = "sha256:" + "ab" * 32


def built(inputs: dict[str, str], **fields) -> BuildResult:
    return BuildResult(
        processor="cpu",
        engine="podman",
        image="myriad/server-cpu:0.1.0-0123456789ab",
        digest="sha256:" + "cd" * 32,
        content_hash=content_hash("cpu", inputs),
        build_inputs=inputs,
        **fields,
    )


def test_the_recorded_image_is_what_deploys_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MYRIAD_HOME", str(tmp_path))
    # Built with a base image this shell no longer names: the computed tag differs.
    inputs = {"BASE_IMAGE": "localhost/some-base:1"}
    assert image_for("cpu", DeployOptions()) == image_tag("cpu")
    write_build_record(built(inputs))
    assert read_build_record("cpu").build_inputs == inputs
    assert image_for("cpu", DeployOptions()) == "myriad/server-cpu:0.1.0-0123456789ab"
    # An explicit image still wins; a record for another registry does not apply.
    assert image_for("cpu", DeployOptions(images={"cpu": "mine:1"})) == "mine:1"
    registry = "123456789012.dkr.ecr.us-east-1.amazonaws.com/myriad"
    assert image_for("cpu", DeployOptions(registry=registry)) == image_tag("cpu", registry)


def test_a_pushed_image_is_pinned_by_its_digest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MYRIAD_HOME", str(tmp_path))
    registry = "registry.example:5000/myriad"
    pushed = msgspec.structs.replace(
        built({}), image=f"{registry}/server-cpu:0.1.0-0123456789ab", digest=DIGEST, pushed=True
    )
    write_build_record(pushed, registry + "/")
    assert image_for("cpu", DeployOptions(registry=registry)) == f"{pushed.image}@{DIGEST}"


def test_a_record_of_other_sources_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MYRIAD_HOME", str(tmp_path))
    stale = msgspec.structs.replace(built({}), content_hash="0" * 64)
    write_build_record(stale)
    assert image_for("cpu", DeployOptions()) == image_tag("cpu")


@pytest.mark.slow
def test_a_new_shell_deploys_what_myriad_build_built(cpu_image: str, tmp_path: Path) -> None:
    """``myriad build`` with this machine's build settings, then deploy and load-test in a
    shell that has none of them."""
    from packing.contracts import ModelSpec
    from serving.build.tracing import TraceSettings, trace_to_store
    from serving.store import open_store

    store = f"file://{tmp_path}/store"
    trace_to_store(
        ModelSpec(id="tiny-record", source="synthetic:bert-tiny", max_length=16),
        "cpu",
        open_store(store),
        TraceSettings(profile_batch_sizes=(1,), profile_repeats=1),
    )
    plan = save(one_server_plan(["tiny-record"]), tmp_path / "plan.json")
    bare = {k: v for k, v in os.environ.items() if k not in VARIABLES}
    bare |= {"MYRIAD_HOME": str(tmp_path / "home"), "COLUMNS": "200"}

    def myriad(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "flows.cli", *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
            timeout=600,
        )

    building = myriad("build", "--processor", "cpu", env={**bare, **build_env()})
    assert building.returncode == 0, building.stderr
    assert read_build_record("cpu", tmp_path / "home").image == cpu_image
    name = f"record-{free_port()}"
    deployed = myriad(
        "deploy", "--plan", str(plan), "--runtime", "docker", "--store", store, "--name", name,
        env=bare,
    )  # fmt: skip
    try:
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        tested = myriad(
            "loadtest", "--plan", str(plan), "--name", name, "--mode", "sequential",
            "--duration", "1", env=bare,
        )  # fmt: skip
        assert tested.returncode == 0, tested.stdout + tested.stderr
        assert "error_rate" in tested.stdout
    finally:
        stopped = myriad("teardown", "--name", name, env=bare)
    assert stopped.returncode == 0 and "stopped 1 servers" in stopped.stdout
