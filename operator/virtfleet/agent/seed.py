"""The cloud-init NoCloud seed: an ISO 9660 image labelled ``cidata``.

cloud-init finds it by the volume label and reads ``user-data``, ``meta-data`` and
``network-config`` from its root. The instance id is the VM's uid, so a re-created seed
for the same VM does not make cloud-init run its first-boot modules again.
"""

from __future__ import annotations

import io
import json


def seed_files(
    *, uid: str, hostname: str, user_data: str | None, network_data: str | None
) -> dict[str, bytes]:
    """File name → content of the seed (pure; what the ISO holds)."""
    meta = {"instance-id": uid, "local-hostname": hostname}
    files = {
        "meta-data": json.dumps(meta, sort_keys=True).encode() + b"\n",
        "user-data": (user_data or "#cloud-config\n{}\n").encode(),
    }
    if network_data is not None:
        files["network-config"] = network_data.encode()
    return files


def build_iso(files: dict[str, bytes]) -> bytes:
    """An ISO 9660 + Joliet + Rock Ridge image, volume id ``cidata``, with ``files`` at its root."""
    import pycdlib  # ~6 MiB, for the VMs that have a cloud-init seed

    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident="cidata")
    for index, (name, content) in enumerate(sorted(files.items())):
        short = f"/F{index}.;1"  # ISO 9660 8.3 names; the real names come from RR/Joliet
        iso.add_fp(io.BytesIO(content), len(content), short, rr_name=name, joliet_path=f"/{name}")
    out = io.BytesIO()
    iso.write_fp(out)
    iso.close()
    return out.getvalue()
