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
    for command in ("run", "trace", "pack", "serve", "deploy", "teardown", "loadtest"):
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
        (("teardown", "--name", "ghost"), "no deployment named 'ghost'"),
        (("pack",), "give --problem PROBLEM"),
        (("trace", "--fleet", "examples/demo.yaml", "--store", "ftp://x"), "ftp://x"),
    ],
)
def test_errors_exit_2_without_traceback(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    result = myriad(*args, home=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr
