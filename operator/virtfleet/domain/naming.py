"""Names of devices inside a domain: guest target names and virtfleet's device aliases.

User aliases (``ua-`` prefix, libvirt ≥ 3.9) survive define, start and migration, so the
observed XML says which spec disk or NIC a device is without guessing from order. Disk
and interface names are DNS labels, so ``ua-disk-<name>`` always matches libvirt's alias
pattern ``[a-zA-Z0-9_\\-.]+``, and the distinct prefixes keep disks, NICs and the seed
apart.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "CLOUD_INIT_ALIAS",
    "disk_alias",
    "disk_name_from_alias",
    "interface_alias",
    "interface_name_from_alias",
    "target_dev",
]

DISK_ALIAS_PREFIX: Final = "ua-disk-"
INTERFACE_ALIAS_PREFIX: Final = "ua-nic-"
#: The NoCloud seed disk (read-only, virtio); not a spec disk.
CLOUD_INIT_ALIAS: Final = "ua-cloudinit"


def disk_alias(name: str) -> str:
    return f"{DISK_ALIAS_PREFIX}{name}"


def interface_alias(name: str) -> str:
    return f"{INTERFACE_ALIAS_PREFIX}{name}"


def disk_name_from_alias(alias: str | None) -> str | None:
    """The spec disk name behind an alias, ``None`` for a device virtfleet did not name."""
    if alias is None or not alias.startswith(DISK_ALIAS_PREFIX):
        return None
    return alias.removeprefix(DISK_ALIAS_PREFIX) or None


def interface_name_from_alias(alias: str | None) -> str | None:
    if alias is None or not alias.startswith(INTERFACE_ALIAS_PREFIX):
        return None
    return alias.removeprefix(INTERFACE_ALIAS_PREFIX) or None


def target_dev(prefix: str, index: int) -> str:
    """``vda``, ``vdb`` … ``vdz``, ``vdaa`` … — libvirt's own disk-name numbering.

    The letters are a bijective base-26 number, as in ``virDiskNameToIndex``.
    """
    if index < 0:
        raise ValueError("a disk index is never negative")
    letters = ""
    n = index + 1
    while n:
        n, remainder = divmod(n - 1, 26)
        letters = chr(ord("a") + remainder) + letters
    return f"{prefix}{letters}"
