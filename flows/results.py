"""Where flow and task results persist: ``$MYRIAD_RESULTS`` names a saved block by slug
(``s3-bucket/<name>``: a prefect-aws ``S3Bucket``; any Prefect writable file-system block works),
else Prefect's local storage (``$PREFECT_LOCAL_STORAGE_PATH``, by default under
``$PREFECT_HOME/storage``). Results are small by construction: URIs, digests and figures."""

from __future__ import annotations

from typing import Any

from serving import settings
from serving.settings import SettingsError

RESULTS_VARIABLE = "MYRIAD_RESULTS"


def results_slug() -> str | None:
    slug = (settings.current().results.block or "").strip()
    if not slug or slug == "local":
        return None
    if slug.count("/") != 1 or not all(slug.split("/")):
        raise SettingsError(
            f"{RESULTS_VARIABLE}={slug!r}: name a saved block by slug, "
            "e.g. s3-bucket/myriad-results"
        )
    return slug


def result_options() -> dict[str, Any]:
    """``@flow`` keyword arguments: persist results, to the configured block if there is one.
    Read when the flow module is imported, so once per flow-run process under a worker."""
    options: dict[str, Any] = {"persist_result": True, "result_serializer": "json"}
    slug = results_slug()
    if slug is not None:
        options["result_storage"] = slug
    return options
