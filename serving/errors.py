"""The serving errors, typed, each with the HTTP answer it gets: the REST front ends, the
metrics and the data plane read this one table."""

from __future__ import annotations


class ServingError(Exception):
    """An error the server answers with its own status (never a 500)."""

    status = 500
    title = "Internal error"
    headers: dict[str, str] | None = None


class ModelNotFound(ServingError, KeyError):
    status, title = 404, "Model not found"

    def __init__(self, model_id: str) -> None:
        super().__init__(model_id)
        self.model_id = model_id

    def __str__(self) -> str:
        return f"model {self.model_id!r} is not served here"


class ModelNotReady(ServingError, RuntimeError):
    status, title = 503, "Model not ready"

    def __init__(self, model_id: str, state: object, reason: str | None) -> None:
        detail = f": {reason}" if reason else ""
        super().__init__(f"model {model_id!r} is {getattr(state, 'value', state)}{detail}")
        self.model_id = model_id
        self.state = state


class InvalidInput(ServingError, ValueError):
    """The request's content cannot be served (empty text, too many texts, bad tensors)."""

    status, title = 400, "Invalid input"


class NotSupported(ServingError, RuntimeError):
    """The operation exists but not for this kind of model or repository."""

    status, title = 409, "Not supported"


class Overloaded(ServingError, RuntimeError):
    """A queue is full: refused at once, the client should retry later."""

    status, title, headers = 503, "Overloaded", {"Retry-After": "1"}


class DeadlineExceeded(ServingError, RuntimeError):
    """The request waited past its deadline and was dropped without being computed."""

    status, title = 504, "Deadline exceeded"


class LoadFailed(ServingError, RuntimeError):
    """A model asked for could not be loaded (not in the store, a damaged artifact)."""

    status, title = 400, "Load failed"


class Unauthorized(ServingError, PermissionError):
    status, title, headers = 401, "Unauthorized", {"WWW-Authenticate": "Bearer"}


class Forbidden(ServingError, PermissionError):
    status, title = 403, "Forbidden"


def status_of(exc: BaseException) -> int:
    return exc.status if isinstance(exc, ServingError) else 500
