"""The build record: what ``myriad build`` (or the pipeline's build task) last built for each
processor, kept in the data directory (``builds/<processor>.json``) so that ``deploy`` and
``run`` in another shell find the image without the build's settings (a base image, a wheel
directory, a CA bundle change the tag's hash). A pushed image is named by its registry digest,
so servers pin exactly what was built."""

from __future__ import annotations

import functools
from datetime import UTC, datetime
from pathlib import Path

import msgspec

from packing.io import load, save
from serving import settings
from serving.build.images import ROOT, BuildResult, content_hash


class BuildRecord(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    schema_version: int = 1
    processor: str
    image: str  # the tag built (or pushed)
    digest: str  # local image id; after a push, the registry's manifest digest
    content_hash: str
    pushed: bool = False
    registry: str | None = None
    build_inputs: dict[str, str] = {}
    built_at: str = ""

    @property
    def reference(self) -> str:
        """What a server runs: a pushed image by its digest (``tag@sha256:…``, immutable), a
        local one by its tag (a local image id is not a pullable reference)."""
        return f"{self.image}@{self.digest}" if self.pushed and self.digest else self.image


def record_path(processor: str, home: Path | None = None) -> Path:
    return (home or settings.current().data_dir) / "builds" / f"{processor}.json"


def write_build_record(
    result: BuildResult, registry: str | None = None, home: Path | None = None
) -> BuildRecord:
    record = BuildRecord(
        processor=result.processor,
        image=result.image,
        digest=result.digest,
        content_hash=result.content_hash,
        pushed=result.pushed,
        registry=registry.rstrip("/") if registry else None,
        build_inputs=dict(result.build_inputs),
        built_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    save(record, record_path(result.processor, home))
    return record


def read_build_record(processor: str, home: Path | None = None) -> BuildRecord | None:
    path = record_path(processor, home)
    return load(path, BuildRecord) if path.is_file() else None


def recorded_image(
    processor: str, registry: str | None = None, root: Path | None = None
) -> str | None:
    """The image the last build of ``processor`` made (under ``registry`` when one is given),
    if this checkout still builds the same image; None otherwise (no record, another registry,
    or sources changed since: the tag computed from the sources then says "not built")."""
    record = read_build_record(processor)
    if record is None:
        return None
    if registry is not None and record.registry != registry.rstrip("/"):
        return None
    inputs = tuple(sorted(record.build_inputs.items()))
    if _context_hash(processor, inputs, root or ROOT) != record.content_hash:
        return None
    return record.reference


@functools.lru_cache(maxsize=16)
def _context_hash(processor: str, inputs: tuple[tuple[str, str], ...], root: Path) -> str:
    # Once per process: a plan asks for each server's image, and the hash reads the context.
    return content_hash(processor, dict(inputs), root)
