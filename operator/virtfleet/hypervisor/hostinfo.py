"""What libvirtd says about its host: capacity and versions, for ``VMHost`` and liveness."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import libvirt

__all__ = [
    "HostFacts",
    "libvirt_version",
    "libvirt_version_via_new_connection",
    "read_host_facts",
    "version_string",
]


@dataclass(frozen=True, slots=True)
class HostFacts:
    """What a node reports about itself in ``VMHost`` (bytes and plain numbers)."""

    hostname: str
    hypervisor_type: str
    hypervisor_version: str
    libvirt_version: str
    cpus: int
    memory_bytes: int
    free_memory_bytes: int


def version_string(packed: int) -> str:
    """libvirt packs versions as ``major * 1_000_000 + minor * 1_000 + release``."""
    return f"{packed // 1_000_000}.{packed // 1_000 % 1_000}.{packed % 1_000}"


def read_host_facts(conn: Any) -> HostFacts:
    """Worker thread: capacity and versions of the node behind ``conn``."""
    info = conn.getInfo()
    return HostFacts(
        hostname=str(conn.getHostname()),
        hypervisor_type=str(conn.getType()),
        hypervisor_version=version_string(int(conn.getVersion())),
        libvirt_version=version_string(int(conn.getLibVersion())),
        cpus=int(info[2]),
        memory_bytes=int(info[1]) * 1024 * 1024,
        free_memory_bytes=int(conn.getFreeMemory()),
    )


def libvirt_version(conn: Any) -> int:
    """Worker thread: libvirtd's packed version; the cheapest call that proves it answers."""
    return int(conn.getLibVersion())


async def libvirt_version_via_new_connection(uri: str) -> int:
    """libvirtd's version over a fresh read-only connection (closed again)."""

    def call() -> int:
        conn = libvirt.openReadOnly(uri)
        try:
            return libvirt_version(conn)
        finally:
            conn.close()

    return await asyncio.to_thread(call)
