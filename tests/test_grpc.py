"""KServe v2 over gRPC against a real server started by the local runtime, with a standard
client (tritonclient's gRPC client, unchanged and at its defaults, and its asyncio client):
liveness, readiness, metadata, infer with BYTES texts and INT64 ids as raw contents (and typed
``contents`` both ways through the protocol's own stub), unknown models NOT_FOUND, bad input
INVALID_ARGUMENT, the repository index, the model configuration, load and unload, metrics, and
many concurrent infers.

The checks themselves are in tests/grpc_checks.py and run in a client process of their own
(spawned once per server): tritonclient.grpc and KServe's SDK register different protobuf
messages under the same names, so they cannot load in the one pytest process."""

from __future__ import annotations

import importlib
import multiprocessing
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from packing.contracts import ModelSpec
from packing.io import save
from serving.build.tracing import TraceSettings, trace_to_store
from serving.runtimes.base import DeployOptions, wait_ready
from serving.runtimes.local import LocalRuntime
from serving.store import open_store
from tests.servers import one_server_plan

pytestmark = pytest.mark.slow

TOKEN = "grpc-admin"  # tests/grpc_checks.py loads and unloads with it
SPECS = [
    ModelSpec(id="g-cls", source="synthetic:bert-tiny", num_labels=3, max_length=32),
    ModelSpec(id="g-emb", source="synthetic:bert-tiny", task="embedding", max_length=32),
]


def _check(name: str, target: str, url: str) -> None:
    # In the client process: the checks' module (and tritonclient.grpc) load only there.
    importlib.import_module("tests.grpc_checks").run(name, target, url)


class Client:
    """Runs a check of tests/grpc_checks.py against one server in the client process."""

    def __init__(self, pool: ProcessPoolExecutor, target: str, url: str) -> None:
        self.pool, self.target, self.url = pool, target, url

    def check(self, name: str) -> None:
        self.pool.submit(_check, name, self.target, self.url).result(timeout=300)


@pytest.fixture(scope="module", params=[1, 2], ids=["one-process", "two-front-ends"])
def client(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator:
    """A server as the local runtime starts it (gRPC on a port of its own), on one process and
    with two HTTP front-end processes (gRPC is then answered by the engine process)."""
    root: Path = tmp_path_factory.mktemp("grpc")
    uri = f"file://{root}/store"
    for spec in SPECS:
        trace_to_store(spec, "cpu", open_store(uri), TraceSettings(profile_batch_sizes=(1,)))
    plan = one_server_plan([s.id for s in SPECS])
    plan_file = save(plan, root / "plan.json")
    runtime = LocalRuntime(log_dir=root / "logs")
    options = DeployOptions(
        store_uri=uri,
        server_args=["--workers", str(request.param)],
        env={"MYRIAD_LOG_LEVEL": "warning", "MYRIAD_ADMIN_TOKEN": TOKEN},
    )
    url, handle = runtime.start_server(plan.servers[0], plan_file, options)
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            wait_ready({"server": url}, 120, lambda _: runtime.exit_reason(handle))
            yield Client(pool, runtime.grpc_target(handle), url)
    finally:
        runtime.stop_server(handle)


def test_liveness_readiness_and_metadata(client: Client) -> None:
    client.check("liveness_readiness_and_metadata")


def test_infer_texts_as_raw_contents_matches_rest(client: Client) -> None:
    client.check("infer_texts_as_raw_contents_matches_rest")


def test_infer_int64_ids(client: Client) -> None:
    client.check("infer_int64_ids")


def test_typed_contents_both_ways(client: Client) -> None:
    client.check("typed_contents_both_ways")


def test_unknown_models_are_not_found(client: Client) -> None:
    client.check("unknown_models_are_not_found")


def test_bad_requests_are_invalid_arguments(client: Client) -> None:
    client.check("bad_requests_are_invalid_arguments")


def test_errors_are_counted_in_the_metrics(client: Client) -> None:
    client.check("errors_are_counted_in_the_metrics")


def test_repository_index_and_model_config(client: Client) -> None:
    client.check("repository_index_and_model_config")


def test_many_concurrent_async_infers(client: Client) -> None:
    client.check("many_concurrent_async_infers")


def test_load_and_unload_need_the_admin_token(client: Client) -> None:
    client.check("load_and_unload_need_the_admin_token")


def test_every_typed_error_has_a_status_code(client: Client) -> None:
    client.check("status_codes")
