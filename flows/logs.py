"""Prefect's console logs without tracebacks for a user's mistake: a flow or task run that
fails with a ``MyriadError`` (a bad fleet, a failed build, an infeasible plan) still logs its
message, and the run's state carries it, but the terminal shows no traceback; a bug keeps its
traceback, and ``--debug`` keeps them all. Prefect's API handler sees the record before the
console's does (handlers of the run loggers come before those of ``prefect``), so the run's
logs in the UI keep the traceback."""

from __future__ import annotations

import logging
from collections.abc import Callable

from packing.errors import MyriadError


def _user_error(exc: BaseException | None) -> bool:
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, MyriadError):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


class DropUserErrorTracebacks(logging.Filter):
    def __init__(self, debug: Callable[[], bool]) -> None:
        super().__init__()
        self.debug = debug

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and not self.debug() and _user_error(record.exc_info[1]):
            record.exc_info = None
            record.exc_text = None
        return True


def quiet_user_errors(debug: Callable[[], bool]) -> None:
    """Install the filter on Prefect's console handlers, setting up Prefect's logging first:
    it does so lazily, and a later setup is incremental, which keeps these handlers."""
    from prefect.logging.configuration import PROCESS_LOGGING_CONFIG, setup_logging

    if not PROCESS_LOGGING_CONFIG:
        setup_logging()
    for name in ("prefect", "prefect._internal", ""):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not any(
                isinstance(f, DropUserErrorTracebacks) for f in handler.filters
            ):
                handler.addFilter(DropUserErrorTracebacks(debug))
