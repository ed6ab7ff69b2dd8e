"""A disk whose ``source.http`` image the node downloads: check, fetch, verify, store.

Split from :mod:`virtfleet.agent.driver` (which calls it) because it is one policy of its
own: what a tenant's URL may reach (:class:`~virtfleet.hypervisor.download.DestinationPolicy`)
and what a refusal may tell them (a reason and our words; the remote's go to the log).
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from virtfleet.agent.errors import ActionError
from virtfleet.agent.settings import AgentSettings
from virtfleet.api.virtualmachine import Disk, HttpSource
from virtfleet.hypervisor import Hypervisor, VolumeRef, download, images, storage
from virtfleet.hypervisor import errors as hv_errors
from virtfleet.logs import get_logger

_log = get_logger("virtfleet.agent.httpdisk")


def http_base_volume_name(uid: str, disk: str) -> str:
    """The downloaded image under an ``http`` disk (the disk is an overlay on it)."""
    return f"{uid}-{disk}.http-base"


def policy_of(settings: AgentSettings) -> download.DestinationPolicy:
    """The agent's deny-list (a CIDR that does not parse stops the agent at start)."""
    return download.DestinationPolicy.from_cidrs(
        settings.http_deny_cidrs, settings.http_allow_cidrs
    )


def check_url(disk: Disk) -> None:
    """A URL that cannot be fetched is refused before anything is made for the VM."""
    assert disk.source.http is not None
    try:
        download.check_url(disk.source.http.url)
    except download.DownloadError as exc:
        raise ActionError(exc.reason, f"disk {disk.name!r}: {exc.message}", permanent=True) from exc


async def import_http(
    hv: Hypervisor,
    settings: AgentSettings,
    policy: download.DestinationPolicy,
    *,
    uid: str,
    disk: Disk,
    pool: str,
    name: str,
    source: HttpSource,
    size: int | None,
) -> None:
    """Download, verify and inspect the image, store it as the disk's base volume,
    then make the disk an overlay on it. The overlay is made last: its existence is
    what says the disk is complete, so a crash before it only leaves a base that the
    next attempt replaces (and that deleting the VM removes, like every uid- volume).
    """
    limit = min(settings.http_max_bytes, size) if size else settings.http_max_bytes
    loop = asyncio.get_running_loop()
    spool = Path(settings.download_dir or tempfile.gettempdir())
    try:
        got = await loop.run_in_executor(
            None,
            lambda: download.fetch(source.url, source.sha256, spool, limit, policy=policy),
        )
    except download.DownloadError as exc:
        # The remote's own words (digest, size, status line) go to the log only.
        _log.warning(
            "http source refused",
            uid=uid,
            disk=disk.name,
            reason=exc.reason,
            error=exc.message,
            detail=exc.detail,
        )
        raise ActionError(exc.reason, f"disk {disk.name!r}: {exc.message}", permanent=True) from exc
    try:
        info = await loop.run_in_executor(
            None, lambda: images.inspect(str(got.path), name=source.url.rsplit("/", 1)[-1])
        )
        if size is not None and info.virtual_size > size:
            raise ActionError(
                download.SOURCE_TOO_LARGE,
                f"disk {disk.name!r}: the image's virtual size {info.virtual_size} is larger "
                f"than the disk's size {size}",
                permanent=True,
            )
        base = http_base_volume_name(uid, disk.name)
        stored = await storage.upload_file(hv, pool, base, str(got.path))
        if stored.format != info.format or stored.backing_path is not None:
            await storage.delete_volume(hv, pool, base)
            raise hv_errors.UnsafeImage(
                f"libvirt sees the download as {stored.format} "
                f"(backing: {stored.backing_path or 'none'}), not a plain {info.format}"
            )
        await storage.create_overlay(hv, pool, name, VolumeRef(pool, base), size)
    except hv_errors.UnsafeImage as exc:
        raise ActionError("UnsafeImage", f"disk {disk.name!r}: {exc}", permanent=True) from exc
    finally:
        got.path.unlink(missing_ok=True)
