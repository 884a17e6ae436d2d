"""When a task run is retried: only when a network step failed (the store, a registry, the
Kubernetes API). A parity failure, an infeasible packing or a bad fleet fails the same way every
time, so it fails at once."""

from __future__ import annotations

from typing import Any

from prefect.tasks import exponential_backoff

# Retries for network steps: 3 more tries after 2, 4 and 8 seconds (with jitter).
NETWORK_RETRIES = 3
NETWORK_BACKOFF = exponential_backoff(backoff_factor=2)

# Store errors whose message says the request itself is wrong: retrying cannot help.
_DETERMINISTIC_STORE_WORDS = (
    "does not exist",
    "no object",
    "names no bucket",
    "unsupported scheme",
    "absolute path",
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
)


def is_transient(exc: BaseException | None) -> bool:
    """True for errors of the network (connection refused or reset, timeouts, a store or API
    that answered 5xx or 429), looking through the exception's causes."""
    seen = 0
    while exc is not None and seen < 8:
        if _transient_one(exc):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def _transient_one(exc: BaseException) -> bool:
    import httpx

    from serving.store import IntegrityError, ObjectNotFound, StoreError

    if isinstance(exc, (ConnectionError, TimeoutError, httpx.TransportError)):
        return True
    if isinstance(exc, (ObjectNotFound, IntegrityError)):
        return False
    if isinstance(exc, StoreError):
        return not any(word in str(exc) for word in _DETERMINISTIC_STORE_WORDS)
    module = type(exc).__module__ or ""
    if module.startswith(("botocore", "urllib3")):
        name = type(exc).__name__
        return any(word in name for word in ("Connect", "Timeout", "ConnectionClosed", "Protocol"))
    status = getattr(exc, "status", None)
    if module.startswith("kubernetes") and isinstance(status, int):
        return status >= 500 or status == 429
    return False


def network_only(task: Any, task_run: Any, state: Any) -> bool:
    """A Prefect ``retry_condition_fn``: retry only when the failure is transient."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception as error:  # the result itself could not be read: treat as that error
        exc = error
    return isinstance(exc, BaseException) and is_transient(exc)


def network_retries() -> dict[str, Any]:
    """Keyword arguments for ``@task``: retries with backoff on network failures only."""
    return {
        "retries": NETWORK_RETRIES,
        "retry_delay_seconds": NETWORK_BACKOFF,
        "retry_jitter_factor": 0.5,
        "retry_condition_fn": network_only,
    }


# ``@task`` keyword arguments for a task whose small result persists (to the flow's result
# storage: $MYRIAD_RESULTS or local). Prefect keys a persisted task result by its cache key and
# NO_CACHE has none, so the key is the task run's own id: a result is written, never reused.
PERSISTED: dict[str, Any] = {
    "cache_policy": None,
    "persist_result": True,
    "result_storage_key": "{task_run.task_name}-{task_run.id}",
    # JSON, not pickle: readable in the bucket, and a torch object could not slip in.
    "result_serializer": "json",
}
