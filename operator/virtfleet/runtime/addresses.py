"""``host:port`` arguments of the endpoints the processes serve (console, metrics)."""

from __future__ import annotations

__all__ = ["split_listen"]


def split_listen(listen: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) → (host, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"{listen!r}: want host:port")
    return host.strip("[]"), int(port)
