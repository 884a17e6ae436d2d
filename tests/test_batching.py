"""Per-model dynamic batching on real traced models: same answers, fairness, backpressure."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
import torch

from packing.contracts import ModelSpec
from serving.backends.torchscript import Batcher, TorchScriptModel
from serving.build.tracing import TraceSettings, trace_to_store
from serving.errors import DeadlineExceeded, Overloaded
from serving.store import artifact_prefix, open_store

SPECS = [
    ModelSpec(id=f"bat-{i}", source="synthetic:bert-tiny", num_labels=3, max_length=32)
    for i in range(2)
]
QUICK = TraceSettings(profile_batch_sizes=(1,), profile_repeats=1)
TEXTS = [f"text number {i} with {'many ' * (i % 4)}words" for i in range(8)]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[TorchScriptModel]:
    store = open_store(f"file://{tmp_path_factory.mktemp('batching')}/store")
    loaded = []
    for spec in SPECS:
        trace_to_store(
            spec, "cpu", store, TraceSettings(profile_batch_sizes=(1,), profile_repeats=1)
        )
        model = TorchScriptModel(spec.id, "cpu", artifact_prefix(spec.id, "cpu"))
        model.load(store, None)
        assert model.ready, model.reason
        loaded.append(model)
    return loaded


def test_batched_answers_are_the_answers_alone(models: list[TorchScriptModel]) -> None:
    model = models[0]
    batcher = Batcher(max_batch=8, max_wait_s=0.2)
    try:
        futures = [f for text in TEXTS for f in batcher.submit(model, [text], raw=True)]
        answers = [f.result(timeout=30) for f in futures]
    finally:
        batcher.close()
    assert batcher.batches == 1 and list(batcher.batch_sizes) == [8]
    for text, answer in zip(TEXTS, answers, strict=True):
        alone = model.predict([text], raw=True)[0]
        torch.testing.assert_close(
            torch.tensor(answer["logits"]), torch.tensor(alone["logits"]), atol=1e-5, rtol=0
        )


def test_a_flooded_model_does_not_starve_another(models: list[TorchScriptModel]) -> None:
    busy, quiet = models
    batcher = Batcher(max_batch=4, max_wait_s=0.001, per_model_queue=1000)
    finished: list[str] = []
    lock = threading.Lock()

    def note(name: str):
        def done(_):
            with lock:
                finished.append(name)

        return done

    try:
        flood = batcher.submit(busy, [TEXTS[0]] * 200)
        for future in flood:
            future.add_done_callback(note("busy"))
        (single,) = batcher.submit(quiet, [TEXTS[1]])
        single.add_done_callback(note("quiet"))
        single.result(timeout=30)
        for future in flood:
            future.result(timeout=60)
    finally:
        batcher.close()
    # Round-robin: the quiet model's text ran within the first few batches, not after 200.
    assert finished.index("quiet") < 20, finished.index("quiet")


def test_full_queues_refuse_at_once_and_late_texts_are_dropped(
    models: list[TorchScriptModel],
) -> None:
    model = models[0]
    batcher = Batcher(max_batch=2, max_wait_s=10.0, per_model_queue=3, total_queue=100)
    try:
        batcher.submit(model, ["a"])
        started = time.perf_counter()
        with pytest.raises(Overloaded, match="waiting"):
            batcher.submit(model, ["b", "c", "d"])
        assert time.perf_counter() - started < 0.1
    finally:
        batcher.close()
    late = Batcher(deadline_s=0.0, max_wait_s=0.0)
    try:
        (future,) = late.submit(model, ["too late"])
        with pytest.raises(DeadlineExceeded):
            future.result(timeout=10)
    finally:
        late.close()


@pytest.mark.slow
def test_server_flood_gets_fast_503s_then_serves_again(tmp_path: Path) -> None:
    import httpx

    from tests.servers import model_server

    store = f"file://{tmp_path}/store"
    trace_to_store(
        SPECS[0],
        "cpu",
        open_store(store),
        TraceSettings(profile_batch_sizes=(1,), profile_repeats=1),
    )
    args = ("--queue", "2", "--max-batch", "2", "--max-wait-ms", "20")
    with model_server(store, [SPECS[0].id], tmp_path / "server.log", extra_args=args) as url:
        statuses: list[int] = []
        retry_after: set[str] = set()

        async def flood(requests: int) -> None:
            # Connections opened first, then every request at once: threads starting one by
            # one on a loaded machine arrived slowly enough for a queue of 2 to keep up.
            limits = httpx.Limits(max_connections=requests, max_keepalive_connections=requests)
            async with httpx.AsyncClient(limits=limits, timeout=60) as client:
                await asyncio.gather(*(client.get(f"{url}/ping") for _ in range(requests)))
                responses = await asyncio.gather(
                    *(
                        client.post(f"{url}/predictions/{SPECS[0].id}", json={"text": text})
                        for text in [" ".join(["flood"] * 60)] * requests
                    )
                )
            for response in responses:
                statuses.append(response.status_code)
                if response.status_code == 503:
                    retry_after.add(response.headers.get("retry-after", ""))

        def resident() -> float:
            text = httpx.get(f"{url}/metrics").text
            line = next(x for x in text.splitlines() if x.startswith("myriad_process_resident"))
            return float(line.split()[-1])

        before = resident()
        asyncio.run(flood(200))
        assert 503 in statuses and 200 in statuses
        assert set(statuses) <= {200, 503} and retry_after == {"1"}
        after = httpx.post(f"{url}/predictions/{SPECS[0].id}", json={"text": "calm again"})
        assert after.status_code == 200
        assert resident() < before + 100e6  # the flood left no backlog behind
        metrics = httpx.get(f"{url}/metrics").text
        # Requests that queued while the worker was busy ran together.
        count = next(
            float(x.split()[-1])
            for x in metrics.splitlines()
            if x.startswith(f'myriad_batch_size_count{{model="{SPECS[0].id}"}}')
        )
        total = next(
            float(x.split()[-1])
            for x in metrics.splitlines()
            if x.startswith(f'myriad_batch_size_sum{{model="{SPECS[0].id}"}}')
        )
        assert total > count  # some batches held more than one text


@pytest.mark.slow
def test_graceful_shutdown_drains_requests_in_flight(tmp_path: Path) -> None:
    """SIGTERM while requests wait in a batch: each still gets its answer, then the process
    exits on its own."""
    import os
    import signal
    import subprocess
    import sys

    import httpx

    from tests.servers import free_port

    store = f"file://{tmp_path}/store"
    trace_to_store(SPECS[0], "cpu", open_store(store), QUICK)
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "serving",
            "--models",
            SPECS[0].id,
            "--store",
            store,
            "--port",
            str(port),
            "--max-batch",
            "64",
            "--max-wait-ms",
            "1500",
        ],
        env={**os.environ, "MYRIAD_LOG_LEVEL": "warning"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        statuses: list[int] = []

        def ask(i: int) -> None:
            answer = httpx.post(f"{url}/predictions/{SPECS[0].id}", json={"text": f"t {i}"})
            statuses.append(answer.status_code)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        time.sleep(0.5)  # all eight are waiting for the batch to fill
        process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(timeout=30)
        assert statuses == [200] * 8
        # uvicorn re-raises the signal once it has shut down cleanly.
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.slow
def test_server_drops_requests_past_their_deadline(tmp_path: Path) -> None:
    import httpx

    from tests.servers import model_server

    store = f"file://{tmp_path}/store"
    trace_to_store(SPECS[0], "cpu", open_store(store), QUICK)
    # A batch lingers 300 ms to fill, longer than the 50 ms deadline: dropped, never computed.
    args = ("--max-batch", "64", "--max-wait-ms", "300", "--deadline-ms", "50")
    with model_server(store, [SPECS[0].id], tmp_path / "server.log", extra_args=args) as url:
        answer = httpx.post(f"{url}/predictions/{SPECS[0].id}", json={"text": "too slow"})
        assert answer.status_code == 504
        assert answer.json()["title"] == "Deadline exceeded"
        assert "not computed" in answer.json()["detail"]
