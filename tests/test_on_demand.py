"""On-demand models: real servers on loopback over a store of tiny traced BERTs, with more
models than their memory budget holds, for both backends; and the tier's in-flight rule on a
real repository."""

from __future__ import annotations

import asyncio
import json
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from packing.contracts import ModelSpec
from serving.backends.ondemand import OnDemandSettings, parse_bytes
from serving.backends.torchscript import TorchScriptRepository
from serving.build.tracing import TraceSettings, trace_to_store
from serving.errors import Overloaded
from serving.http.server import (
    ServerOptions,
    on_demand_settings,
    parse_server_args,
    plan_server,
)
from serving.store import open_store
from tests.servers import model_server, one_server_plan

FAST = TraceSettings(profile_batch_sizes=(1,), profile_repeats=1)
IDS = [f"od-{i}" for i in range(6)]
RESIDENT, ON_DEMAND = IDS[0], IDS[1:]
COLD = "x-myriad-cold-start"


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    uri = f"file://{tmp_path_factory.mktemp('on-demand')}/store"
    store = open_store(uri)
    for model_id in IDS:
        spec = ModelSpec(id=model_id, source="synthetic:bert-tiny", num_labels=3, max_length=32)
        trace_to_store(spec, "cpu", store, FAST)
    return uri


def metric(text: str, name: str, model: str | None = None) -> float:
    """The sum of a metric's samples (those of ``model`` only, when given)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if model is not None and f'model="{model}"' not in line:
            continue
        total += float(line.rsplit(" ", 1)[1])
    return total


def model_bytes(url: str, model_id: str) -> int:
    listing = httpx.get(f"{url}/models").json()["models"]
    return next(m["memory_bytes"] for m in listing if m["id"] == model_id)


def drive(url: str, requests: int, watch: list[float]) -> list[httpx.Response]:
    """``requests`` predictions spread over every model from 6 threads, the loaded bytes
    sampled from /metrics meanwhile."""
    rng = random.Random(7)
    order = [rng.choice(IDS) for _ in range(requests)]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            watch.append(metric(httpx.get(f"{url}/metrics").text, "myriad_models_loaded_bytes"))

    sampler = threading.Thread(target=sample)
    sampler.start()
    with httpx.Client(timeout=60) as client, ThreadPoolExecutor(6) as pool:
        answers = list(
            pool.map(lambda m: client.post(f"{url}/predictions/{m}", json={"text": "hi"}), order)
        )
    done.set()
    sampler.join()
    return answers


def check_served_within_budget(url: str, budget: int) -> None:
    ready = httpx.get(f"{url}/v2/health/ready")
    assert ready.status_code == 200, ready.text
    states = {m["id"]: m["state"] for m in httpx.get(f"{url}/models").json()["models"]}
    assert states == {RESIDENT: "ready", **{m: "unloaded" for m in ON_DEMAND}}
    assert httpx.get(f"{url}/ping").json()["status"] == "Healthy"

    watch: list[float] = []
    answers = drive(url, 120, watch)
    assert [a.status_code for a in answers] == [200] * len(answers)
    assert any(a.headers.get(COLD) == "1" for a in answers)
    assert all(COLD not in a.headers for a in answers if a.url.path.endswith(RESIDENT))

    text = httpx.get(f"{url}/metrics").text
    one_model = model_bytes(url, RESIDENT)
    assert max(watch) <= budget + one_model
    assert metric(text, "myriad_memory_budget_bytes") == budget
    assert metric(text, "myriad_model_evictions_total") > 0
    # More loads than on-demand models: evicted ones came back.
    assert metric(text, "myriad_model_loads_total") > len(IDS)
    assert metric(text, "myriad_cold_start_requests_total") == sum(
        a.headers.get(COLD) == "1" for a in answers
    )
    assert metric(text, "myriad_cold_start_requests_total", RESIDENT) == 0
    assert metric(text, "myriad_model_load_seconds_count") == metric(
        text, "myriad_model_loads_total"
    )
    # The v2 route flags a cold start too.
    loaded = {m["id"] for m in httpx.get(f"{url}/models").json()["models"] if m["state"] == "ready"}
    cold_id = next(m for m in ON_DEMAND if m not in loaded)
    infer = httpx.post(
        f"{url}/v2/models/{cold_id}/infer",
        json={"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["hi"]}]},
    )
    assert infer.status_code == 200 and infer.headers[COLD] == "1"
    again = httpx.post(f"{url}/predictions/{cold_id}", json={"text": "hi"})
    assert again.status_code == 200 and COLD not in again.headers


# The cross-model engine's host copies: the resident model plus two on-demand models' worth
# (bert-tiny: about 210 kB each).
BUDGET = 700_000


def profiled_bytes(store_uri: str, model_id: str) -> int:
    """The model's memory as its profile (and so the packer) counts it: what a TorchScript
    server's budget holds it as."""
    path = open_store(store_uri).local_path(f"models/{model_id}/cpu/profile.json")
    assert path is not None
    return int(json.loads(path.read_bytes())["memory_bytes"])


def test_torchscript_server_over_budget_answers_everything(store_uri: str, tmp_path: Path) -> None:
    # Room for the resident model and about two on-demand ones, of the five.
    budget = int(3.5 * max(profiled_bytes(store_uri, m) for m in IDS))
    args = ("--on-demand", *ON_DEMAND, "--memory-budget", str(budget), "--threads", "2")
    with model_server(store_uri, IDS, tmp_path / "ts.log", extra_args=args) as url:
        check_served_within_budget(url, budget)


def test_cross_model_server_behind_front_ends(store_uri: str, tmp_path: Path) -> None:
    # --workers 2: the cold-start header must cross the front ends too.
    args = (
        "--backend",
        "cross-model",
        "--on-demand",
        ",".join(ON_DEMAND),
        "--host-memory-budget",
        "700kB",
        "--max-concurrent-loads",
        "1",
        "--workers",
        "2",
    )
    with model_server(store_uri, IDS, tmp_path / "cm.log", extra_args=args) as url:
        listing = httpx.get(f"{url}/models").json()["models"]
        assert {m["engine"] for m in listing} == {"cross-model"}
        check_served_within_budget(url, BUDGET)


def test_a_failing_load_answers_its_reason_and_the_others_serve(
    store_uri: str, tmp_path: Path
) -> None:
    store = open_store(store_uri)
    spec = ModelSpec(id="od-bad", source="synthetic:bert-tiny", num_labels=3, max_length=32)
    trace_to_store(spec, "cpu", store, FAST)
    ids = [*IDS[:3], "od-bad"]
    budget = int(3.5 * max(profiled_bytes(store_uri, m) for m in ids))
    args = ("--on-demand", *ids[1:], "--memory-budget", str(budget))
    with model_server(store_uri, ids, tmp_path / "bad.log", extra_args=args) as url:
        # Verified at start; damaged afterwards, so the load itself finds it.
        path = store.local_path("models/od-bad/cpu/model.ts")
        assert path is not None
        original = path.read_bytes()
        data = bytearray(original)
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        try:
            refused = httpx.post(f"{url}/predictions/od-bad", json={"text": "x"})
            assert refused.status_code == 503
            assert refused.json()["title"] == "Model load failed"
            assert "model.ts" in refused.json()["detail"]
            v2 = httpx.post(
                f"{url}/v2/models/od-bad/infer",
                json={
                    "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["x"]}]
                },
            )
            assert v2.status_code == 503 and "model.ts" in v2.json()["error"]
            for model_id in ids[:3]:
                answer = httpx.post(f"{url}/predictions/{model_id}", json={"text": "x"})
                assert answer.status_code == 200
            models = {m["id"]: m for m in httpx.get(f"{url}/models").json()["models"]}
            assert models["od-bad"]["state"] == "failed"
        finally:
            path.write_bytes(original)
        # The next request tries the load again.
        assert httpx.post(f"{url}/predictions/od-bad", json={"text": "x"}).status_code == 200


def test_an_artifact_missing_at_start_keeps_the_server_not_ready(
    store_uri: str, tmp_path: Path
) -> None:
    ids = [RESIDENT, "od-1", "never-traced"]
    args = ("--on-demand", "od-1", "never-traced")
    with model_server(
        store_uri, ids, tmp_path / "m.log", wait_for="finished", extra_args=args
    ) as url:
        ready = httpx.get(f"{url}/v2/health/ready")
        assert ready.status_code == 503 and ready.json()["failed"] == ["never-traced"]
        assert httpx.get(f"{url}/ping").json()["status"] == "Loading"
        missing = httpx.post(f"{url}/predictions/never-traced", json={"text": "x"})
        assert missing.status_code == 503 and "manifest" in missing.json()["detail"]
        answer = httpx.post(f"{url}/predictions/od-1", json={"text": "x"})
        assert answer.status_code == 200 and answer.headers[COLD] == "1"


def test_a_model_with_work_in_flight_is_not_evicted(store_uri: str) -> None:
    # Room for one on-demand model beside the resident one. The wait for memory is generous:
    # it is what a busy machine's loads must finish within, and only the refusal below waits
    # it out.
    budget = sum(profiled_bytes(store_uri, m) for m in [RESIDENT, *ON_DEMAND[:2]]) - 1
    settings = OnDemandSettings(
        model_ids=frozenset(ON_DEMAND[:2]), memory_budget_bytes=budget, load_wait_s=2.0
    )
    repository = TorchScriptRepository(
        open_store(store_uri), [RESIDENT, *ON_DEMAND[:2]], on_demand=settings
    )
    first, second = ON_DEMAND[:2]
    try:
        repository.load_all()
        tier = repository.tier
        assert tier is not None and repository.ready

        async def scenario() -> None:
            assert await tier.acquire(first) is True  # cold: loaded for this request
            # ``first`` is held (a batch in flight): ``second`` cannot get its memory.
            with pytest.raises(Overloaded):
                await tier.acquire(second)
            assert repository.models[first].ready
            assert repository.models[first].predict(["still here"])
            tier.release(first)
            assert await tier.acquire(second) is True
            tier.release(second)
            assert not repository.models[first].ready
            assert repository.models[first].state.value == "unloaded"

        asyncio.run(scenario())
        assert tier.evictions == 1 and tier.loaded_bytes <= settings.memory_budget_bytes
    finally:
        repository.close()


def test_plan_on_demand_tier_sets_the_budget() -> None:
    plan = one_server_plan(IDS)
    server = plan.servers[0]
    server.on_demand_model_ids = list(ON_DEMAND)
    server.memory_bytes = 5_000_000
    server.cache_memory_bytes = 4_000_000
    model_ids, processor, planned = plan_server(plan, server.id)
    assert model_ids == IDS and processor == "cpu"
    settings = on_demand_settings(ServerOptions(model_ids=model_ids, planned=planned))
    assert settings is not None
    assert settings.model_ids == frozenset(ON_DEMAND)
    assert settings.memory_budget_bytes == 5_000_000
    # An option overrides the plan's budget; a plan without the tier changes nothing.
    override = ServerOptions(model_ids=model_ids, planned=planned, memory_budget=1_000)
    assert on_demand_settings(override).memory_budget_bytes == 1_000  # type: ignore[union-attr]
    plain = plan_server(one_server_plan(IDS), "i000-d0")[2]
    assert "on_demand_model_ids" not in plain
    assert on_demand_settings(ServerOptions(model_ids=IDS, planned=plain)) is None


def test_on_demand_options() -> None:
    options = parse_server_args(
        [
            "--models",
            "a,b,c",
            "--on-demand",
            "b",
            "c",
            "--memory-budget",
            "512MiB",
            "--host-memory-budget",
            "2GB",
            "--max-concurrent-loads",
            "3",
        ]
    )
    assert options.on_demand == ["b", "c"] and options.memory_budget == 512 * 2**20
    assert options.host_memory_budget == 2 * 10**9 and options.max_concurrent_loads == 3
    assert parse_bytes("1.5k") == 1500 and parse_bytes("1000") == 1000
    with pytest.raises(ValueError, match="not a size"):
        parse_bytes("lots")
    with pytest.raises(Exception, match="not among this server's models"):
        on_demand_settings(ServerOptions(model_ids=["a"], on_demand=["z"]))
