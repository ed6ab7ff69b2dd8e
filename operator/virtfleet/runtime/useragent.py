"""How virtfleet's processes name themselves to the apiserver (``User-Agent``).

The apiserver's audit log tells clients apart by user and User-Agent, and every agent
may run as the same ServiceAccount. client-go says ``<binary>/<version> (...)``; ours
says the component and, for an agent, its node: ``virtfleet-agent/0.1.0 (node-a)``.
kopf's session appends ``kopf/<version>``, so its watches and patches stay apart from
virtfleet's own client in the same process.
"""

from __future__ import annotations

from virtfleet import __version__

__all__ = ["identify", "user_agent"]

_current = f"virtfleet/{__version__}"


def identify(component: str, node: str | None = None) -> None:
    """Name this process (once, at start-up, before any client is made)."""
    global _current
    _current = f"virtfleet-{component}/{__version__}" + (f" ({node})" if node else "")


def user_agent() -> str:
    return _current
