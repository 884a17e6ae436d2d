"""The ``myriad`` command as a user runs it: a subprocess, exit codes, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

TINY_FLEET = """
name: cli
processors: [cpu]
models:
  - {id: tiny-cli, source: "synthetic:bert-tiny", max_length: 16}
"""


def myriad(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MYRIAD_HOME": str(home), "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )


def test_help_lists_every_command(tmp_path: Path) -> None:
    result = myriad("--help", home=tmp_path)
    assert result.returncode == 0
    for command in (
        "run", "build", "trace", "pack", "serve", "deploy", "redeploy", "status", "teardown",
        "gateway", "loadtest",
    ):  # fmt: skip
        assert command in result.stdout


def test_bad_fleet_is_one_clear_line(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(TINY_FLEET.replace("max_length: 16", "max_length: -3"))
    result = myriad("trace", "--fleet", str(fleet), home=tmp_path)
    assert result.returncode == 2
    assert f"{fleet}: field models[0].max_length" in result.stderr
    assert "Traceback" not in result.stderr


def test_trace_twice_traces_once(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(TINY_FLEET)
    store = f"file://{tmp_path}/store"
    first = myriad("trace", "--fleet", str(fleet), "--store", store, home=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "1 traced, 0 unchanged" in first.stdout
    second = myriad("trace", "--fleet", str(fleet), "--store", store, home=tmp_path)
    assert "0 traced, 1 unchanged" in second.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("deploy", "--plan", "missing-plan.json"), "missing-plan.json: no such file"),
        (("pack",), "give --problem PROBLEM"),
        (("observe", "--name", "ghost"), "no deployment named 'ghost'"),
        (("rebalance", "--name", "ghost"), "no deployment named 'ghost'"),
        (("trace", "--fleet", "examples/demo.yaml", "--store", "ftp://x"), "ftp://x"),
        (("serve", "--models", "x", "--memory-budget", "lots"), "'lots' is not a size"),
    ],
)
def test_errors_exit_2_without_traceback(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    result = myriad(*args, home=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr


def test_a_misspelt_runtime_is_refused_before_anything_runs(tmp_path: Path) -> None:
    result = myriad("run", "--runtime", "dockr", home=tmp_path)
    assert result.returncode == 2
    assert "'dockr' is not one of local, docker, kubernetes" in " ".join(result.stderr.split())
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            "{id: tiny-cli, source: 'synthetic:bert-tiny', trafic_rps: 3}",
            "unknown field `trafic_rps`",
        ),
        ("{id: Tiny-CLI, source: 'synthetic:bert-tiny'}", "'^[a-z0-9][a-z0-9._-]{0,62}$'"),
    ],
)
def test_run_refuses_a_bad_fleet_in_one_line(tmp_path: Path, entry: str, message: str) -> None:
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(f"name: bad\nprocessors: [cpu]\nmodels:\n  - {entry}\n")
    result = myriad("run", "--fleet", str(fleet), home=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    # The rich console keeps the pattern's brackets, and the whole message on one line.
    assert f"error: {fleet}: field models[0]" in result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 2
    assert "Traceback" not in result.stdout + result.stderr


def test_teardown_of_nothing_says_so_twice(tmp_path: Path) -> None:
    for _ in range(2):
        result = myriad("teardown", "--name", "ghost", home=tmp_path)
        assert result.returncode == 0, result.stderr
        assert "no deployment named 'ghost' is running" in result.stdout


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = myriad("--debug", "deploy", "--plan", "missing-plan.json", home=tmp_path)
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "missing-plan.json" in result.stderr


def test_serve_names_a_model_that_cannot_load_and_exits(tmp_path: Path) -> None:
    from serving.runtimes.local import free_port

    result = myriad("serve", "--models", "no-such-model", "--port", str(free_port()), home=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "no-such-model: failed: ObjectNotFound" in result.stdout
    assert "none of the 1 models could be loaded" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_pack_a_problem_file_then_repack_it(tmp_path: Path) -> None:
    import msgspec

    sys.path.insert(0, str(ROOT))
    from benchmarks.packing import generate
    from packing.contracts import Catalog, Plan
    from packing.io import load, save

    problem = generate(60, 3, load(ROOT / "catalogs/aws.yaml", Catalog))
    save(problem, tmp_path / "problem.yaml")
    first = myriad(
        "pack",
        "--problem",
        str(tmp_path / "problem.yaml"),
        "--out",
        str(tmp_path / "plan.json"),
        "--time-limit",
        "5",
        home=tmp_path,
    )
    assert first.returncode == 0, first.stderr
    assert "lower bound" in first.stdout and "total" in first.stdout
    assert (tmp_path / "plan.png").read_bytes()[:4] == b"\x89PNG"
    plan = load(tmp_path / "plan.json", Plan)
    assert len(plan.model_ids()) == 60

    changed = msgspec.structs.replace(problem, models=problem.models[5:])
    save(changed, tmp_path / "changed.yaml")
    second = myriad(
        "pack",
        "--problem",
        str(tmp_path / "changed.yaml"),
        "--out",
        str(tmp_path / "next.json"),
        "--current",
        str(tmp_path / "plan.json"),
        "--tolerance",
        "0.5",
        "--time-limit",
        "5",
        home=tmp_path,
    )
    assert second.returncode == 0, second.stderr
    assert "incremental:" in second.stdout
    moves = msgspec.json.decode((tmp_path / "next.moves.json").read_bytes())
    removed = {m.id for m in problem.models[:5]}
    assert {m["model_id"] for m in moves if m["target"] is None} >= removed
    assert load(tmp_path / "next.json", Plan).model_ids() == sorted(m.id for m in changed.models)


@pytest.mark.slow
def test_a_failed_build_in_a_pipeline_run_is_one_error_without_traceback(tmp_path: Path) -> None:
    """The build task fails inside the flow: the run's state and the CLI say why, in a line,
    and Prefect's console shows no traceback for it."""
    from tests.containers import ensure_podman

    ensure_podman()
    env_fleet = tmp_path / "fleet.yaml"
    env_fleet.write_text(TINY_FLEET)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "run",
            "--runtime",
            "docker",
            "--fleet",
            str(env_fleet),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={
            **os.environ,
            "MYRIAD_HOME": str(tmp_path),
            "MYRIAD_CONTAINER_ENGINE": "podman",
            "MYRIAD_BASE_IMAGE": "localhost/no-such-base:1",
            "COLUMNS": "200",
        },
        timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "Traceback" not in output
    assert "error: podman build of myriad/server-cpu" in result.stderr
    assert "Finished in state Failed('Flow run encountered an exception: BuildError" in output


@pytest.mark.slow
def test_deploy_to_docker_without_an_image_says_to_build(tmp_path: Path) -> None:
    from packing.io import save
    from tests.containers import ensure_podman
    from tests.servers import one_server_plan

    ensure_podman()
    plan = save(one_server_plan(["tiny-cli"]), tmp_path / "plan.json")
    # A base image no build used: the tag this checkout would get was never built.
    env_home = tmp_path / "home"
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "deploy", "--plan", str(plan), "--runtime", "docker"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={
            **os.environ,
            "MYRIAD_HOME": str(env_home),
            "MYRIAD_BASE_IMAGE": f"localhost/never-built-{os.getpid()}:1",
            "COLUMNS": "200",
        },
        timeout=300,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "is not built here; run `myriad build --processor cpu`" in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 2
    assert "Traceback" not in result.stdout + result.stderr
