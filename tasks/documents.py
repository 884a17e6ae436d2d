"""Read the documents flows are given by URI (fleet, catalog, plan): a local path,
``file:///abs/path`` or ``s3://bucket/key``. Flows pass these URIs between stages, so the
Prefect database holds a short string, not a plan."""

from __future__ import annotations

from pathlib import Path

from packing.contracts import Plan
from serving.store import read_document

__all__ = ["base_dir", "local_path", "open_plan", "read_document"]


def base_dir(uri: str) -> Path | None:
    """Where a fleet's relative ``hf:`` sources resolve: the fleet file's folder (None on S3)."""
    if uri.startswith("s3://"):
        return None
    return Path(uri.removeprefix("file://")).resolve().parent


def open_plan(uri: str) -> Plan:
    return read_document(uri, Plan)


def local_path(uri: str) -> Path | None:
    """The local file behind ``uri``, or None for an object store."""
    if uri.startswith("s3://"):
        return None
    return Path(uri.removeprefix("file://"))
