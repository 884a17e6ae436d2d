"""The one base of every error a user can cause or act on (a bad fleet field, an unknown
runtime, nothing deployed, a failed build, an infeasible plan). The edges (the CLI, a flow's
state message, a server's main) report these in a line or two, never as a traceback; anything
else is a bug and keeps its traceback.

It lives in ``packing``, the bottom layer, so that every layer's errors can derive from it."""

from __future__ import annotations


class MyriadError(Exception):
    """A mistake the user can fix; ``str(error)`` names what is wrong, ``hint`` what to do."""

    hint: str | None = None

    def __init__(self, message: str = "", *args: object, hint: str | None = None) -> None:
        super().__init__(message, *args)
        if hint is not None:
            self.hint = hint

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text}\n{self.hint}" if self.hint else text
