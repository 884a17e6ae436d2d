"""The README's shell blocks, run as a user runs them: in order, in one scratch directory with
no data directory of its own (``.myriad`` is created there), each block a ``bash -e`` script.

A comment just before a block says how it is run:
- ``<!-- readme-test: skip: REASON -->``: not runnable here (a cloud account, or ``make`` itself,
  which CI runs); the test is skipped with that reason, so each one is named in the report.
- ``<!-- readme-test: foreground -->``: each line is a server that runs until Ctrl-C; it must
  print its address and answer there, then stop on SIGINT.
- ``<!-- readme-test: setup: COMMAND -->``: COMMAND runs first, unseen by the reader (what the
  prose around the block already told them to do).
Every other ``sh`` block runs as written and must exit 0."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from serving.settings import VARIABLES

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
# What a block may reach in its directory, as in a checkout.
LINKED = (
    ".venv", "examples", "catalogs", "infra", "benchmarks", "flows", "Dockerfiles",
    "prefect.yaml", "pyproject.toml", "packing", "serving", "loadtest", "tasks", "tests",
)  # fmt: skip
_MARK = re.compile(r"<!--\s*readme-test:\s*(skip|foreground|setup)\s*:?\s*(.*?)\s*-->")
_FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass(frozen=True)
class Block:
    line: int
    code: str
    mode: str  # run | skip | foreground
    note: str = ""
    setup: str = ""

    @property
    def id(self) -> str:
        first = next((ln for ln in self.code.splitlines() if ln.strip()), "")
        words = re.sub(r"[^a-z0-9 ]", " ", first.lower()).split()
        return f"L{self.line}-" + "-".join(words[:4])


def readme_blocks(text: str) -> list[Block]:
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    marks: list[tuple[str, str]] = []
    while i < len(lines):
        if match := _MARK.search(lines[i]):
            marks.append((match[1], match[2]))
        fence = _FENCE.match(lines[i])
        if not fence:
            if lines[i].strip() and not _MARK.search(lines[i]):
                marks = []
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        if fence[1] == "sh":
            kinds = dict(marks)
            mode = "skip" if "skip" in kinds else "foreground" if "foreground" in kinds else "run"
            blocks.append(
                Block(
                    line=i + 1,
                    code="\n".join(lines[i + 1 : end]),
                    mode=mode,
                    note=kinds.get("skip", ""),
                    setup=kinds.get("setup", ""),
                )
            )
        marks = []
        i = end + 1
    return blocks


BLOCKS = readme_blocks(README.read_text())


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A directory that looks like a fresh checkout with the venv made, and no data directory.
    What a block leaves running in the background (a Prefect server, a worker) lives until
    the last block, as in the user's shell, and is stopped here."""
    root = tmp_path_factory.mktemp("readme")
    for name in LINKED:
        (root / name).symlink_to(ROOT / name)
    yield root
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for group in _GROUPS:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, sig)
        time.sleep(5 if sig == signal.SIGTERM else 0)
    # Whatever a block deployed and did not stop (its own teardown block failed).
    for record in (root / ".myriad" / "deployments").glob("*.json"):
        if record.name.count(".") == 1:
            subprocess.run(
                [str(ROOT / ".venv/bin/myriad"), "teardown", "--name", record.stem],
                cwd=root,
                env=bare_environment(root),
                capture_output=True,
                check=False,
            )


_GROUPS: list[int] = []


def bare_environment(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in VARIABLES}
    env.pop("MYRIAD_SETTINGS", None)
    return env | {"COLUMNS": "200", "HOME": str(root / "home")}


def test_the_readme_has_blocks_and_names_each_it_skips() -> None:
    assert len(BLOCKS) >= 5
    for block in BLOCKS:
        if block.mode == "skip":
            assert block.note, f"README line {block.line}: a skipped block says why"


def _foreground(block: Block, root: Path, env: dict[str, str]) -> None:
    # A line continued with a trailing backslash is one command, as bash reads it.
    commands = block.code.replace("\\\n", " ").splitlines()
    for command in (ln for ln in commands if ln.strip()):
        process = subprocess.Popen(
            ["bash", "-c", f"exec {command}"],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            port = re.search(r"--port (\d+)", command)
            assert port, f"README line {block.line}: {command!r} names no --port"
            url = f"http://127.0.0.1:{port[1]}"
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                assert process.poll() is None, f"{command!r} exited: {process.stdout.read()}"
                try:
                    if httpx.get(f"{url}/v2/health/live", timeout=2).status_code < 500:
                        break
                except httpx.HTTPError:
                    time.sleep(0.5)
            else:
                pytest.fail(f"{command!r} did not answer at {url} in 120 s")
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_readme_block(block: Block, scratch: Path) -> None:
    if block.mode == "skip":
        pytest.skip(f"README line {block.line}: {block.note}")
    env = bare_environment(scratch)
    if block.mode == "foreground":
        _foreground(block, scratch, env)
        return
    script = f"set -eo pipefail\n{block.setup}\n{block.code}\n"
    log = scratch / f"block-{block.line}.log"
    with open(log, "w") as out:
        # Its own process group, kept: a `cmd &` in the block outlives the script.
        process = subprocess.Popen(
            ["bash", "-c", script],
            cwd=scratch,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _GROUPS.append(process.pid)
        try:
            returncode = process.wait(timeout=900)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise
    output = log.read_text()
    assert returncode == 0, f"README line {block.line} failed:\n{output[-6000:]}"
    assert "Traceback" not in output, output[-6000:]
