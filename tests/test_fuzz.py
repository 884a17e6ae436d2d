"""Fuzz the server's OpenAPI schema with schemathesis: no input may get a 5xx."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from packing.contracts import ModelSpec
from serving.build.tracing import TraceSettings, trace_to_store
from serving.store import open_store
from tests.servers import model_server

pytestmark = pytest.mark.slow

SPEC = ModelSpec(id="fuzz-0", source="synthetic:bert-tiny", num_labels=2, max_length=16)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("fuzz")
    uri = f"file://{root}/store"
    trace_to_store(SPEC, "cpu", open_store(uri), TraceSettings(profile_batch_sizes=(1,)))
    with model_server(
        uri, [SPEC.id], root / "server.log", env={"MYRIAD_ADMIN_TOKEN": "fuzz-token"}
    ) as url:
        yield url


def test_no_input_gets_a_server_error(fuzz_server: str) -> None:
    # schemathesis' pytest plugin does not run under this pytest, so drive its strategies
    # through hypothesis directly: every operation of the served OpenAPI schema.
    schema = schemathesis.openapi.from_url(f"{fuzz_server}/schema/openapi.json")
    checked = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
        def no_server_error(case) -> None:
            response = case.call(timeout=30)
            assert response.status_code < 500, (
                case.method,
                case.formatted_path,
                response.text[:500],
            )

        no_server_error()
        checked.append(f"{operation.method.upper()} {operation.path}")
    assert (
        "POST /predictions/{model_id}" in checked and "POST /v2/models/{model_id}/infer" in checked
    )
