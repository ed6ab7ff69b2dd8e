"""Names that become file names or on-disk tags, checked before they reach libvirt.

Volume names become files in a pool's directory and snapshot names become qcow2 tags or
external file names, so one rule guards both against path traversal (DESIGN §4).
"""

from __future__ import annotations

import re

from virtfleet.hypervisor import errors

__all__ = ["validate_name"]

#: Conservative file-name alphabet; no leading dot (hidden files, ``.`` and ``..``).
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,254}")


def validate_name(name: str, what: str = "volume name") -> str:
    """Return ``name`` if it is a safe pool/volume/snapshot name, else raise ``InvalidName``.

    Refuses ``/``, ``..`` anywhere, a leading ``.``, empty and over-long (> 255) names, and
    any character outside ``[A-Za-z0-9_.+-]`` (no NUL, whitespace, shell or XML specials).
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise errors.InvalidName(f"invalid {what} {name!r}: use [A-Za-z0-9_.+-], no leading '.'")
    return name
