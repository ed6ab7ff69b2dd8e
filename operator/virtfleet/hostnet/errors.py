"""The one error the host network adapter raises: upper layers never see netlink's."""

from __future__ import annotations


class HostNetworkError(Exception):
    """An action (or an observation) failed; the message says which and why."""
