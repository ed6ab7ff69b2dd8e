"""The agent's one error type for refusals an object's conditions carry (with a reason).

The VM loop and the snapshot and restore loops raise it alike.
"""

from __future__ import annotations


class ActionError(Exception):
    """An action could not be done; ``permanent`` when retrying cannot help (Stalled)."""

    def __init__(self, reason: str, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.permanent = permanent
