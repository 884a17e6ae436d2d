"""``--workers N``: front-end processes answer HTTP and hand the hot routes to the one engine
process over ZeroMQ. Real servers on loopback, real (tiny) models: the answers, errors and
metrics are those of a one-process server, a dead front end is replaced, and no front end
outlives its engine."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from loadtest import generator as loadgen
from packing.contracts import ModelSpec
from serving.build.tracing import TraceSettings, trace_to_store
from serving.store import open_store
from tests.servers import model_server

pytestmark = pytest.mark.slow

SPECS = [
    ModelSpec(id="wk-0", source="synthetic:bert-tiny", num_labels=3, max_length=32),
    ModelSpec(id="wk-1", source="synthetic:bert-tiny", task="embedding", max_length=32),
]
TEXTS = ["the order arrived late", "please send the invoice again", "weather says rain"]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("workers")
    uri = f"file://{root}/store"
    for spec in SPECS:
        trace_to_store(spec, "cpu", open_store(uri), TraceSettings(profile_batch_sizes=(1,)))
    return uri


@pytest.fixture(scope="module")
def single(store: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("single") / "server.log"
    with model_server(store, [s.id for s in SPECS], log) as url:
        yield url


def processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        found[int(entry.name)] = (parent, command)
    return found


def engine_and_front_ends(url: str) -> tuple[int, list[int]]:
    """The engine process serving ``url`` and its live front-end processes."""
    port = url.rsplit(":", 1)[1]
    table = processes()
    engine = next(
        pid
        for pid, (_, command) in table.items()
        if "-m serving " in command and f"--port {port}" in command and "supervise" not in command
    )
    front_ends = [
        pid
        for pid, (parent, command) in table.items()
        if parent == engine and "serving.http.workers" in command
    ]
    return engine, front_ends


def wait_for(condition, timeout_s: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met in {timeout_s} s")
        time.sleep(0.1)


def requests_counted(url: str, model_id: str, status: str = "200") -> float:
    prefix = f'myriad_requests_total{{model="{model_id}",status="{status}"}}'
    lines = httpx.get(f"{url}/metrics").text.splitlines()
    return next((float(x.split()[-1]) for x in lines if x.startswith(prefix)), 0.0)


def test_front_ends_answer_as_one_process_does(store: str, single: str, tmp_path: Path) -> None:
    with model_server(
        store, [s.id for s in SPECS], tmp_path / "server.log", extra_args=("--workers", "2")
    ) as url:
        _, front_ends = engine_and_front_ends(url)
        assert len(front_ends) == 2
        for path, body in (
            ("/predictions/wk-0", {"text": TEXTS[0]}),
            ("/predictions/wk-0?raw=1", {"text": TEXTS}),
            ("/predictions/wk-1", {"text": TEXTS[1]}),
            ("/predictions/nope", {"text": "x"}),  # 404, problem details
            ("/predictions/wk-0", {"txt": "x"}),  # 400, problem details
            ("/v2/models/wk-1/infer", {"inputs": []}),  # 400, v2 error body
        ):
            expected, answer = (
                httpx.post(single + path, json=body),
                httpx.post(url + path, json=body),
            )
            assert answer.status_code == expected.status_code, (path, answer.text)
            assert answer.headers["content-type"] == expected.headers["content-type"]
            assert answer.json() == expected.json(), path
        tensors = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [3], "data": TEXTS}]}
        expected = httpx.post(f"{single}/v2/models/wk-0/infer", json=tensors).json()
        assert httpx.post(f"{url}/v2/models/wk-0/infer", json=tensors).json() == expected
        oversized = httpx.post(f"{url}/predictions/wk-0", content=b"x" * (2 << 20))
        assert oversized.status_code == 413

        # Every request is counted once, in the engine, whichever front end took it (a new
        # connection per request lands on either).
        before = requests_counted(url, "wk-0")
        for _ in range(20):
            with httpx.Client() as fresh:
                assert fresh.post(f"{url}/predictions/wk-0", json={"text": "x"}).status_code == 200
        assert requests_counted(url, "wk-0") == before + 20
        assert httpx.get(f"{url}/v2/models/wk-0/ready").status_code == 200

        # Under concurrent load over keep-alive connections nothing is lost on the way.
        targets = loadgen.Targets(routes={s.id: [f"{url}/predictions/{s.id}"] for s in SPECS})
        recorder = loadgen.run(
            "closed", targets, loadgen.Shape(tokens=8), loadgen.Bounds(duration_s=2.0), 16
        )
        summary = recorder.summary("closed", concurrency=16)
        assert summary["completed"] > 100 and summary["error_rate"] == 0.0, summary["errors"]


def test_a_dead_front_end_is_replaced(store: str, tmp_path: Path) -> None:
    with model_server(
        store, [SPECS[0].id], tmp_path / "server.log", extra_args=("--workers", "2")
    ) as url:
        engine, front_ends = engine_and_front_ends(url)
        os.kill(front_ends[0], signal.SIGKILL)
        wait_for(
            lambda: (
                len(engine_and_front_ends(url)[1]) == 2
                and front_ends[0] not in engine_and_front_ends(url)[1]
            ),
            what="a replacement front end",
        )
        assert engine_and_front_ends(url)[0] == engine  # the models stayed loaded
        for _ in range(10):
            with httpx.Client() as fresh:
                assert fresh.post(f"{url}/predictions/wk-0", json={"text": "x"}).status_code == 200


def test_no_front_end_outlives_its_engine(store: str, tmp_path: Path) -> None:
    with model_server(
        store, [SPECS[0].id], tmp_path / "server.log", extra_args=("--workers", "2")
    ) as url:
        engine, front_ends = engine_and_front_ends(url)
        os.kill(engine, signal.SIGKILL)  # no shutdown hook runs: the kernel tells the children
        wait_for(lambda: not set(front_ends) & set(processes()), what="front ends gone")
        # The runtime's supervisor restarts the server, front ends and all.
        wait_for(
            lambda: (
                httpx.get(f"{url}/v2/health/ready").status_code == 200 if _answers(url) else False
            ),
            timeout_s=60,
            what="the restarted server ready",
        )
        restarted, fresh_front_ends = engine_and_front_ends(url)
        assert restarted != engine and len(fresh_front_ends) == 2
    # A graceful stop takes the front ends with it.
    wait_for(lambda: not set(fresh_front_ends) & set(processes()), what="front ends stopped")


def _answers(url: str) -> bool:
    try:
        httpx.get(f"{url}/v2/health/live", timeout=1)
        return True
    except httpx.TransportError:
        return False
