from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.containers import cpu_build, cpu_image  # noqa: F401  (session fixtures)
from tests.s3_server import ACCESS_KEY, SECRET_KEY, S3Server, start_s3_server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = start_s3_server(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_bucket(s3_server: S3Server) -> str:
    # One bucket for the session: SeaweedFS gives each bucket its own volumes, and a bucket per
    # test runs a small test server out of them.
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture
def s3_store_uri(s3_server: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh prefix on the real S3 server, with the standard AWS variables pointing at it."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return f"s3://{s3_bucket}/{uuid.uuid4().hex[:12]}"


@pytest.fixture
def file_store_uri(tmp_path: Path) -> str:
    return f"file://{tmp_path}/store"
