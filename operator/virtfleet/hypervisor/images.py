"""What an image file really is, before QEMU is ever pointed at it.

A disk image is untrusted input: a qcow2 header can name a backing file or an external
data file anywhere on the host (``/etc/shadow``), and a file's name says nothing about its
format. So every image virtfleet downloads for a user is inspected here and refused unless
it is a self-contained qcow2 or a raw image whose format agrees with its name. The qcow2
header is parsed in Python (the agent's image has no qemu-img, and parsing 100 bytes needs
none); other formats QEMU would recognise by their magic are refused rather than taken as
raw. libvirt's own probe is the second check when a volume becomes a backing store
(:func:`virtfleet.hypervisor.storage.create_overlay`).
"""

from __future__ import annotations

import itertools
import struct
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from virtfleet.hypervisor import errors

__all__ = [
    "FORMATS",
    "ImageInfo",
    "check_name_matches_format",
    "flatten_chain",
    "inspect",
    "inspect_header",
]

#: Formats virtfleet accepts for user images. Others (vmdk, vhdx, luks, ...) are refused.
FORMATS = frozenset({"qcow2", "raw"})
#: File name suffixes that claim a format; a file claiming one must have it.
_CLAIMED = {".qcow2": "qcow2", ".qcow": "qcow2", ".raw": "raw"}
#: Enough of the file for the qcow2 header and its extensions (one cluster is >= 512 B).
HEADER_BYTES = 64 * 1024

QCOW2_MAGIC = b"QFI\xfb"
#: Magic numbers of formats QEMU would probe, at offset 0 (refused, never taken as raw).
_OTHER_MAGIC = {
    b"QED\x00": "qed",
    b"KDMV": "vmdk",
    b"COWD": "vmdk",
    b"# Disk DescriptorFile": "vmdk",
    b"vhdxfile": "vhdx",
    b"LUKS\xba\xbe": "luks",
    b"conectix": "vpc",
}
_QCOW2_INCOMPAT_DATA_FILE = 1 << 2
_EXT_END = 0
_EXT_DATA_FILE = 0x44415441
_EXT_ENCRYPTION = 0x0537BE77


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """The facts that decide whether an image is safe to use (sizes in bytes)."""

    format: str
    virtual_size: int


def check_name_matches_format(name: str, fmt: str | None) -> None:
    """Refuse an image whose name claims another format than its content has."""
    claimed = _CLAIMED.get(PurePosixPath(name).suffix.lower())
    if claimed is not None and claimed != fmt:
        raise errors.UnsafeImage(
            f"image {name!r} is named like a {claimed} image but its content is {fmt or 'unknown'}"
        )


def inspect(path: str, *, name: str | None = None, allow_backing: bool = False) -> ImageInfo:
    """Inspect the image file at ``path`` (blocking: run it in an executor).

    Raises :class:`~virtfleet.hypervisor.errors.UnsafeImage` with a readable reason.
    """
    label = name or PurePosixPath(path).name
    try:
        with open(path, "rb") as handle:
            header = handle.read(HEADER_BYTES)
            handle.seek(0, 2)
            size = handle.tell()
    except OSError as exc:
        raise errors.UnsafeImage(f"image {label!r} could not be read: {exc.strerror}") from exc
    return inspect_header(header, size, label, allow_backing=allow_backing)


def inspect_header(
    header: bytes, file_size: int, label: str, *, allow_backing: bool = False
) -> ImageInfo:
    """The checks of :func:`inspect` on the file's first bytes and its size (pure).

    ``allow_backing``: a backing-file name is tolerated (a backup's incremental layer, whose
    backing is replaced by the layer below before anything reads it); data files and
    encryption never are.
    """
    if header.startswith(QCOW2_MAGIC):
        info = _qcow2(header, label, allow_backing=allow_backing)
    else:
        for magic, fmt in _OTHER_MAGIC.items():
            if header.startswith(magic):
                raise errors.UnsafeImage(f"image {label!r} has format {fmt!r}; use qcow2 or raw")
        if file_size <= 0:
            raise errors.UnsafeImage(f"image {label!r} is empty")
        info = ImageInfo(format="raw", virtual_size=file_size)
    check_name_matches_format(label, info.format)
    return info


def _qcow2(header: bytes, label: str, *, allow_backing: bool = False) -> ImageInfo:
    if len(header) < 72:
        raise errors.UnsafeImage(f"image {label!r} has a truncated qcow2 header")
    version, backing_offset, backing_size, _cluster_bits, size, crypt = struct.unpack_from(
        ">IQIIQI", header, 4
    )
    if version == 1:
        raise errors.UnsafeImage(f"image {label!r} has format 'qcow'; use qcow2 or raw")
    if version not in (2, 3):
        raise errors.UnsafeImage(f"image {label!r} has an unknown qcow2 version {version}")
    if (backing_offset or backing_size) and not allow_backing:
        name = header[backing_offset : backing_offset + min(backing_size, 1023)]
        shown = name.decode(errors="replace") if name else "beyond the header"
        raise errors.UnsafeImage(
            f"image {label!r} has a backing file ({shown}); only self-contained images are used"
        )
    if crypt:
        raise errors.UnsafeImage(f"image {label!r} is encrypted; refused")
    extensions_at = 72
    if version == 3:
        if len(header) < 104:
            raise errors.UnsafeImage(f"image {label!r} has a truncated qcow2 header")
        (incompatible,) = struct.unpack_from(">Q", header, 72)
        (extensions_at,) = struct.unpack_from(">I", header, 100)
        if incompatible & _QCOW2_INCOMPAT_DATA_FILE:
            raise errors.UnsafeImage(f"image {label!r} has an external data file; refused")
    _check_extensions(header, extensions_at, label)
    return ImageInfo(format="qcow2", virtual_size=int(size))


def _check_extensions(header: bytes, offset: int, label: str) -> None:
    """Header extensions: a data-file name or an encryption header is refused."""
    while offset + 8 <= len(header):
        kind, length = struct.unpack_from(">II", header, offset)
        if kind == _EXT_END:
            return
        if kind == _EXT_DATA_FILE:
            raise errors.UnsafeImage(f"image {label!r} names an external data file; refused")
        if kind == _EXT_ENCRYPTION:
            raise errors.UnsafeImage(f"image {label!r} is encrypted; refused")
        offset += 8 + (length + 7) // 8 * 8


def flatten_chain(layers: Sequence[Path], out: Path) -> None:
    """Join a backup chain (full first, then each incremental) into one qcow2 at ``out``.

    Blocking: run it in an executor. Each incremental qcow2 holds only the clusters that
    changed; pointing it at the layer below (``rebase -u``: header only, no data read)
    and converting the top reads every cluster through the chain, so ``out`` is the disk
    exactly as the last backup saw it, with no backing file.
    """
    for below, above in itertools.pairwise(layers):
        _qemu_img("rebase", "-u", "-f", "qcow2", "-b", str(below), "-F", "qcow2", str(above))
    _qemu_img(
        "convert", "-f", "qcow2", "-O", "qcow2", "-o", "compat=1.1", str(layers[-1]), str(out)
    )


def _qemu_img(*args: str) -> None:
    done = subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise errors.UnsafeImage(f"qemu-img {args[0]} failed: {done.stderr.strip()[-500:]}")
