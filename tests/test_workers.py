"""``--workers N``: front-end processes decode, tokenise and format the hot routes and hand
the one engine process token ids in binary frames over ZeroMQ. Real servers on loopback, real
(tiny) models: the answers, errors and metrics are those of a one-process server, a dead front
end is replaced, and no front end outlives its engine. The frame codec round-trips, and the
front end's code over the cross-model engine in one process answers as the data plane does."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from loadtest import generator as loadgen
from packing.contracts import ModelSpec
from serving.build.tracing import TraceSettings, trace_to_store
from serving.http import frames
from serving.store import open_store
from tests.servers import model_server

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


def test_the_frame_codec_round_trips() -> None:
    ids = np.array([[101, 7592, 102, 0], [101, 2088, 2003, 102]], dtype=np.uint16)
    mask = (ids != 0).astype(np.uint8)
    wide = np.array([[101, 70_000]], dtype=np.int32)
    data = frames.request_frame(
        [
            frames.encode_ids_item(7, "wk-0", None, ids, mask),
            frames.encode_refusal(0, "x" * 300, 400),
            frames.encode_ids_item(2**32 - 1, "wk-1", "1", wide, np.ones((1, 2), np.uint8)),
        ]
    )
    first, refusal, last = frames.decode_request_frame(data)
    assert (first.request_id, first.model_id, first.version) == (7, "wk-0", None)
    assert first.kind == frames.IDS and np.array_equal(first.input_ids, ids)
    assert np.array_equal(first.attention_mask, mask) and first.input_ids.dtype == np.uint16
    assert (refusal.kind, refusal.model_id, refusal.status) == (frames.REFUSAL, "x" * 300, 400)
    assert (last.request_id, last.version) == (2**32 - 1, "1")
    assert last.input_ids.dtype == np.int32 and np.array_equal(last.input_ids, wide)

    logits = np.array([[0.25, -1.5, 3.0]], dtype=np.float32)
    reply = frames.reply_frame(
        [
            frames.encode_output(7, logits, cold_start=True),
            frames.encode_error(8, 503, "Overloaded", "retry", {"Retry-After": "1"}),
        ]
    )
    done, refused = frames.decode_reply_frame(reply)
    assert (done.request_id, done.status, done.cold_start) == (7, 200, True)
    assert np.array_equal(done.output, logits)
    assert (refused.status, refused.title, refused.message) == (503, "Overloaded", "retry")
    assert refused.headers == {"Retry-After": "1"} and not refused.cold_start

    for broken in (data[:-1], data + b"\0", b"XX" + data[2:], b""):
        with pytest.raises(frames.FrameError):
            frames.decode_request_frame(broken)
    with pytest.raises(frames.FrameError):
        frames.decode_reply_frame(reply[:-3])


def binary_infer(inputs: list[tuple[str, str, list[int], bytes]]) -> tuple[bytes, dict]:
    """A v2 request with every input and output as binary tensor data."""
    header = json.dumps(
        {
            "inputs": [
                {"name": n, "datatype": d, "shape": s, "parameters": {"binary_data_size": len(b)}}
                for n, d, s, b in inputs
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    body = header + b"".join(b for *_, b in inputs)
    return body, {"Inference-Header-Content-Length": str(len(header))}


def texts_bytes(texts: list[str]) -> bytes:
    return b"".join(len(t.encode()).to_bytes(4, "little") + t.encode() for t in texts)


@pytest.mark.slow
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
        ids = [[101, 204, 203, 102], [101, 302, 102, 0]]
        for path, tensors in (
            (
                "/v2/models/wk-0/infer",
                {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [3], "data": TEXTS}]},
            ),
            (
                "/v2/models/wk-1/versions/1/infer",
                {
                    "inputs": [
                        {"name": "text", "datatype": "BYTES", "shape": [1], "data": TEXTS[:1]}
                    ]
                },
            ),
            (
                "/v2/models/wk-0/infer",
                {
                    "inputs": [
                        {"name": "input_ids", "datatype": "INT64", "shape": [2, 4], "data": ids}
                    ]
                },
            ),
            (
                "/v2/models/wk-0/infer",  # 400: outside the vocabulary (the engine's message)
                {
                    "inputs": [
                        {
                            "name": "input_ids",
                            "datatype": "INT64",
                            "shape": [1, 2],
                            "data": [1, 10**9],
                        }
                    ]
                },
            ),
            (
                "/v2/models/wk-0/infer",  # 400: checked in the front end
                {
                    "inputs": [
                        {"name": "input_ids", "datatype": "INT64", "shape": [1, 3], "data": [1, 2]}
                    ]
                },
            ),
            (
                "/v2/models/wk-0/versions/2/infer",
                {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["x"]}]},
            ),
            (
                "/v2/models/nope/infer",
                {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["x"]}]},
            ),
            ("/predictions/wk-0", {"text": []}),  # 400: no text
            ("/predictions/wk-1?raw=1", {"text": TEXTS}),
        ):
            expected, answer = (
                httpx.post(single + path, json=tensors),
                httpx.post(url + path, json=tensors),
            )
            assert answer.status_code == expected.status_code, (path, answer.text)
            assert answer.json() == expected.json(), (path, tensors)
        raw = httpx.post(f"{url}/predictions/wk-0", content=TEXTS[2].encode())
        assert (
            raw.json() == httpx.post(f"{single}/predictions/wk-0", content=TEXTS[2].encode()).json()
        )

        # The binary extension both ways: the same bytes back, texts and ids.
        for inputs in (
            [("text", "BYTES", [3], texts_bytes(TEXTS))],
            [
                ("input_ids", "INT32", [1, 4], np.array([[101, 204, 203, 102]], "<i4").tobytes()),
                ("attention_mask", "INT32", [1, 4], np.array([[1, 1, 1, 0]], "<i4").tobytes()),
            ],
        ):
            body, headers = binary_infer(inputs)
            expected = httpx.post(f"{single}/v2/models/wk-0/infer", content=body, headers=headers)
            answer = httpx.post(f"{url}/v2/models/wk-0/infer", content=body, headers=headers)
            assert expected.status_code == answer.status_code == 200, answer.text
            assert (
                answer.headers["inference-header-content-length"]
                == (expected.headers["inference-header-content-length"])
            )
            assert answer.content == expected.content

        # Refusals in the front end are counted in the engine's metrics.
        refused = requests_counted(url, "wk-0", "400")
        assert httpx.post(f"{url}/predictions/wk-0", json={"txt": "x"}).status_code == 400
        wait_for(
            lambda: requests_counted(url, "wk-0", "400") == refused + 1, what="refusal counted"
        )
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


@pytest.mark.slow
def test_a_dead_front_end_is_replaced(store: str, tmp_path: Path) -> None:
    with model_server(
        store, [SPECS[0].id], tmp_path / "server.log", extra_args=("--workers", "2")
    ) as url:
        engine, front_ends = engine_and_front_ends(url)
        if "TOKENIZERS_PARALLELISM" not in os.environ:
            # The server tokenises serially, and its front ends inherit it.
            environ = Path(f"/proc/{front_ends[0]}/environ").read_bytes().split(b"\0")
            assert b"TOKENIZERS_PARALLELISM=false" in environ
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


@pytest.mark.slow
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


def test_the_front_end_over_the_cross_model_engine_answers_as_the_data_plane(store: str) -> None:
    """The front end's code in one process (``LocalEngine``): tokenised in the front end, run
    by ``CrossModelEngine.submit_ids``, formatted from the output rows; the same answers as the
    data plane's own path, which tokenises in the engine."""
    from serving.backends.crossmodel import CrossModelRepository, CrossModelSettings
    from serving.dataplane.metrics import ServerMetrics
    from serving.dataplane.plane import DataPlane
    from serving.http.fastpath import Call, answer_call
    from serving.http.frontend import FrontEnd, LocalEngine

    repository = CrossModelRepository(
        open_store(store), [s.id for s in SPECS], settings=CrossModelSettings(slots=0)
    )
    repository.load_all()
    plane = DataPlane(repository, ServerMetrics(repository))
    front = FrontEnd(LocalEngine(plane))
    text = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [3], "data": TEXTS}]}
    calls = [
        Call("predict", "wk-0", None, json.dumps({"text": TEXTS[0]}).encode(), "application/json"),
        Call("predict", "wk-0", None, json.dumps(TEXTS).encode(), "application/json", b"raw=1"),
        Call("predict", "wk-1", None, TEXTS[1].encode(), "text/plain"),
        Call("predict", "wk-0", None, b'{"txt": "x"}', "application/json"),
        Call("predict", "nope", None, b'{"text": "x"}', "application/json"),
        Call("infer", "wk-0", None, json.dumps(text).encode()),
        Call("infer", "wk-1", "1", json.dumps(text).encode()),
        Call("infer", "wk-0", "2", json.dumps(text).encode()),
    ]

    async def answer_both() -> list[tuple]:
        return [(await front(call), await answer_call(plane, call)) for call in calls]

    try:
        for call, (new, old) in zip(calls, asyncio.run(answer_both()), strict=True):
            assert (new.status, new.media_type) == (old.status, old.media_type), call
            assert json.loads(new.body) == json.loads(old.body), call
        assert front.infos.keys() == {"wk-0", "wk-1"}  # each asked of the engine once
        wide = np.array([[1, 10**6]], dtype=np.int32)
        with pytest.raises(Exception, match="vocabulary"):
            repository.models["wk-0"].submit_ids(wide, np.ones_like(wide, dtype=np.uint8))
    finally:
        repository.close()


@pytest.mark.parametrize("backend", ["cross-model", "torchscript"])
def test_a_frames_requests_run_as_one_group_and_fail_alone(store: str, backend: str) -> None:
    """``DataPlane.run_ids_group`` (what the engine process runs per model in a frame): the
    requests' rows go to the backend stacked, each answer is the one the request gets alone,
    a request with ids out of the vocabulary or too many tokens fails alone with its own
    status, an unknown model fails every request, and the metrics count each request."""
    from serving.backends.crossmodel import CrossModelRepository, CrossModelSettings
    from serving.backends.torchscript import TorchScriptRepository
    from serving.dataplane.metrics import ServerMetrics
    from serving.dataplane.plane import DataPlane
    from serving.errors import InvalidInput, ModelNotFound

    ids = [s.id for s in SPECS]
    if backend == "cross-model":
        repository = CrossModelRepository(
            open_store(store), ids, settings=CrossModelSettings(slots=0)
        )
        repository.load_all()
    else:
        repository = TorchScriptRepository(open_store(store), ids)
        repository.load_all()
        repository.start()
    plane = DataPlane(repository, ServerMetrics(repository))
    short = np.array([[101, 7, 8, 102]], dtype=np.uint16)
    two = np.array([[101, 9, 102, 0, 0, 0], [101, 5, 6, 7, 8, 102]], dtype=np.uint16)
    mask = lambda a: (a != 0).astype(np.uint8)  # noqa: E731
    bad = np.array([[101, 60000, 102]], dtype=np.uint16)
    long = np.full((1, 40), 5, dtype=np.uint16)
    items = [(short, mask(short)), (bad, mask(bad)), (two, mask(two)), (long, mask(long))]

    async def run() -> tuple[list, list, list, list]:
        loop = asyncio.get_running_loop()
        answers: list = []
        for model_id in ("wk-0", "nope"):
            done = loop.create_future()
            plane.run_ids_group(model_id, None, items, lambda r, c, d=done: d.set_result(r))
            answers.append(await done)
        alone = [await plane.run_ids("wk-0", a, m) for a, m in (items[0], items[2])]
        # A frame of several groups: those of one cross-model engine go as one block of rows.
        frame: list = [loop.create_future() for _ in range(3)]
        plane.run_ids_frame(
            [
                ("wk-0", None, items[:3], lambda r, c: frame[0].set_result(r)),
                ("wk-1", "1", [items[0]], lambda r, c: frame[1].set_result(r)),
                ("wk-0", None, [items[2]], lambda r, c: frame[2].set_result(r)),
            ]
        )
        together = [await f for f in frame]
        embedding = await plane.run_ids("wk-1", *items[0])
        np.testing.assert_allclose(together[1][0], embedding, rtol=1e-4, atol=1e-5)
        return answers[0], answers[1], alone, [together[0][0], together[2][0]]

    try:
        grouped, unknown, alone, together = asyncio.run(run())
        np.testing.assert_allclose(together[0], alone[0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(together[1], alone[1], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(grouped[0], alone[0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(grouped[2], alone[1], rtol=1e-4, atol=1e-5)
        assert grouped[2].shape[0] == 2
        assert isinstance(grouped[1], InvalidInput) and "vocabulary" in str(grouped[1])
        assert isinstance(grouped[3], InvalidInput) and "at most 32" in str(grouped[3])
        assert all(isinstance(r, ModelNotFound) for r in unknown)
        exposition = plane.metrics.exposition().decode()
        assert 'myriad_requests_total{model="wk-0",status="200"} 7.0' in exposition
        assert 'myriad_requests_total{model="wk-0",status="400"} 3.0' in exposition
        assert 'myriad_requests_total{model="_unknown",status="404"} 4.0' in exposition
        assert 'myriad_request_seconds_count{model="wk-0"} 7.0' in exposition
    finally:
        repository.close()


def test_null_forward_answers_zeros_of_the_models_width(store: str) -> None:
    """``python -m serving --null-forward`` (benchmarks only): after one real forward the
    cross-model engine answers zeros of the same shape, through the same batching."""
    from serving.backends.crossmodel import CrossModelRepository, CrossModelSettings
    from serving.dataplane.metrics import ServerMetrics
    from serving.dataplane.plane import DataPlane

    repository = CrossModelRepository(
        open_store(store), ["wk-0"], settings=CrossModelSettings(slots=0, null_forward=True)
    )
    repository.load_all()
    plane = DataPlane(repository, ServerMetrics(repository))
    ids = np.array([[101, 7, 8, 102], [101, 9, 102, 0]], dtype=np.uint16)

    async def twice() -> list[np.ndarray]:
        return [await plane.run_ids("wk-0", ids, (ids != 0).astype(np.uint8)) for _ in range(2)]

    try:
        real, null = asyncio.run(twice())
        assert real.shape == null.shape == (2, 3) and real.any() and not null.any()
    finally:
        repository.close()
