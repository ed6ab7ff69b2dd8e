"""A tiny bootable guest for end-to-end tests: Debian cloud kernel + busybox initramfs.

Why this guest: it boots to init in a few seconds under QEMU TCG (nested KVM does not work
on the test machines), needs no disk image, no network and no credentials, and reports
everything a test wants to know on its serial console (see ``e2e/guest/init``): a boot
marker, a per-second uptime (proves a live migration did not restart it) and, optionally,
a counter persisted on ``/dev/vda`` (proves disk contents survive storage migration) and
what its NIC can reach (``vf.probe``/``vf.fetch``: a DHCP lease, TCP connects, HTTP GETs).

The kernel comes from the Debian package that ``linux-image-cloud-amd64`` depends on
(``apt-get download``, no installation). Its virtio (block, net) and ACPI-button drivers
are modules, so the matching ``.ko`` files are copied into the initramfs and ``insmod``-ed
by init in dependency order. Results are cached under
``${VIRTFLEET_CACHE:-~/.cache/virtfleet}/guest/`` keyed by the kernel package version and
a hash of the init script and of this builder.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "BOOT_MARKER",
    "GuestImage",
    "cache_root",
    "ensure_guest",
    "guest_cmdline",
    "kernel_package",
    "make_base_image",
    "make_blank_disk",
    "read_disk_counter",
]

#: Printed by the guest's init as soon as it runs.
BOOT_MARKER = "VIRTFLEET-GUEST-BOOTED"

#: The metapackage whose dependency names the concrete kernel package.
KERNEL_METAPACKAGE = "linux-image-cloud-amd64"

#: Kernel modules the guest loads, in dependency order (checked against ``depends=``
#: in each module's .modinfo at build time, so a kernel update that adds a dependency
#: fails loudly here instead of silently losing /dev/vda in the guest).
GUEST_MODULES: tuple[str, ...] = (
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
    "af_packet",
    "button",
    "evdev",
)

#: Kernel options every boot needs; ``guest_cmdline`` adds the vf.* knobs.
BASE_CMDLINE = "console=ttyS0 panic=-1"

#: Bump when the layout of the built artefacts changes (part of the cache key).
_BUILDER_VERSION = "1"

_BUSYBOX = Path("/bin/busybox")
_INIT_SCRIPT = Path(__file__).resolve().parent.parent / "guest" / "init"


class GuestBuildError(RuntimeError):
    """The guest kernel or initramfs could not be built; the message says what to fix."""


@dataclass(frozen=True)
class GuestImage:
    """Paths of a built guest on the host, and the kernel command line it expects."""

    kernel: Path
    initrd: Path
    cmdline: str
    kernel_version: str
    """Debian package version of the kernel, e.g. ``6.1.0-56-cloud-amd64 6.1.192-2``."""


def cache_root() -> Path:
    """``$VIRTFLEET_CACHE`` or ``~/.cache/virtfleet``: shared by all e2e runs on a machine."""
    env = os.environ.get("VIRTFLEET_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "virtfleet"


def guest_cmdline(
    *,
    counter: bool = False,
    poweroff_after: int | None = None,
    probe: Sequence[str] = (),
    fetch: Sequence[str] = (),
    net: bool = False,
    echo: int | None = None,
    ping: Sequence[str] = (),
    talk: str | None = None,
    watch: str | None = None,
    static_ip: str | None = None,
    sink: int | None = None,
    send: str | None = None,
    rtt: str | None = None,
    extra: str = "",
) -> str:
    """Kernel command line for the test guest.

    ``counter`` enables the persistent counter on /dev/vda (the domain needs a virtio
    disk); ``poweroff_after`` makes the guest power itself off after that many seconds.
    ``probe`` (``host:port``) and ``fetch`` (``http://host:port/path``) bring up eth0 with
    DHCP and report, on the console, whether each connection opened / what each GET
    returned (``VF-PROBE``, ``VF-FETCH``; host ``gw`` is the DHCP router). With DHCP
    too (``net``, or any of these): ``echo`` runs a TCP echo server on that port,
    ``ping`` pings each address 3 times, ``talk`` (``ip:port``) keeps one TCP session
    to an echo server and ``watch`` pings an address every 50 ms, reporting gaps
    (``VF-ECHO``, ``VF-PING``, ``VF-TALK``/``VF-TALK-END``, ``VF-WATCH``/``VF-WATCH-LOST``;
    see ``e2e/guest/init``). For benchmarks: ``static_ip`` (``a.b.c.d/n``) instead of
    DHCP, ``sink`` a discarding TCP server, ``send`` (``ip:port:MiB:rounds``) timed
    transfers to one, ``rtt`` an average ping time (``VF-SENT``, ``VF-RTT``).
    """
    parts = [BASE_CMDLINE]
    if counter:
        parts.append("vf.counter=1")
    if poweroff_after is not None:
        parts.append(f"vf.poweroff={int(poweroff_after)}")
    wants_net = (echo, talk, watch, static_ip, sink, send, rtt)
    if net or probe or fetch or ping or any(w is not None for w in wants_net):
        parts.append("vf.net=1")
    if static_ip:
        parts.append(f"vf.ip={static_ip}")
    if sink is not None:
        parts.append(f"vf.sink={int(sink)}")
    if send:
        parts.append(f"vf.send={send}")
    if rtt:
        parts.append(f"vf.rtt={rtt}")
    if echo is not None:
        parts.append(f"vf.echo={int(echo)}")
    if ping:
        parts.append("vf.ping=" + ",".join(ping))
    if talk:
        parts.append(f"vf.talk={talk}")
    if watch:
        parts.append(f"vf.watch={watch}")
    if probe:
        parts.append("vf.probe=" + ",".join(probe))
    if fetch:
        parts.append("vf.fetch=" + ",".join(fetch))
    if extra:
        parts.append(extra)
    return " ".join(parts)


def _run(cmd: list[str], *, cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, check=False, capture_output=True, text=True, timeout=600
        )
    except FileNotFoundError as exc:
        raise GuestBuildError(f"{cmd[0]} not found: install it (apt-get install ...)") from exc
    if proc.returncode != 0:
        raise GuestBuildError(
            f"command failed (exit {proc.returncode}): {' '.join(cmd)}\n"
            f"{proc.stderr.strip()[-2000:]}"
        )
    return proc.stdout


def _apt_fingerprint() -> str:
    """Changes whenever apt's package lists change (apt-get update)."""
    h = hashlib.sha256()
    for d in (Path("/var/lib/apt/lists"), Path("/var/cache/apt")):
        for f in sorted(d.glob("*")) if d.is_dir() else []:
            with contextlib.suppress(OSError):
                st = f.stat()
                h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()


def kernel_package() -> tuple[str, str]:
    """(package, version) of the cloud kernel, from the local apt cache (no network).

    apt-cache takes about a second per call, so the answer is memoized on disk against
    a fingerprint of apt's lists: a warm ``ensure_guest`` costs milliseconds.
    """
    memo = cache_root() / "guest" / "apt-kernel.json"
    fingerprint = _apt_fingerprint()
    with contextlib.suppress(OSError, ValueError, KeyError):
        data = json.loads(memo.read_text())
        if data["fingerprint"] == fingerprint:
            return str(data["package"]), str(data["version"])
    package, version = _kernel_package_uncached()
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_name(f".{memo.name}.{os.getpid()}")
    tmp.write_text(json.dumps({"fingerprint": fingerprint, "package": package, "version": version}))
    tmp.replace(memo)
    return package, version


def _kernel_package_uncached() -> tuple[str, str]:
    out = _run(["apt-cache", "depends", KERNEL_METAPACKAGE])
    m = re.search(r"Depends:\s*(linux-image-\S+-cloud-amd64)", out)
    if not m:
        raise GuestBuildError(
            f"apt-cache does not know which kernel {KERNEL_METAPACKAGE} depends on; "
            f"run `apt-get update`.\n{out}"
        )
    package = m.group(1)
    show = _run(["apt-cache", "show", "--no-all-versions", package])
    v = re.search(r"^Version:\s*(\S+)", show, re.MULTILINE)
    if not v:
        raise GuestBuildError(f"no Version for {package} in apt-cache show output")
    return package, v.group(1)


def _modinfo_depends(ko: Path) -> set[str]:
    """Parse ``depends=`` from a module's .modinfo section (kmod's modinfo may be absent)."""
    m = re.search(rb"depends=([^\0]*)\0", ko.read_bytes())
    if not m or not m.group(1):
        return set()
    return {d.decode().replace("-", "_") for d in m.group(1).split(b",") if d}


def _find_modules(root: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for ko in root.glob("lib/modules/*/kernel/**/*.ko*"):
        name = ko.name.split(".ko")[0].replace("-", "_")
        if name in GUEST_MODULES:
            if not ko.name.endswith(".ko"):
                raise GuestBuildError(
                    f"{ko.name} is compressed; busybox insmod needs plain .ko files "
                    "(decompress it in guest.py)"
                )
            found[name] = ko
    return found


def _check_module_order(kernel_root: Path, modules: dict[str, Path]) -> list[str]:
    """Return the modules that exist (others are built in) and verify the load order."""
    builtin_file = next(kernel_root.glob("lib/modules/*/modules.builtin"), None)
    builtin = builtin_file.read_text() if builtin_file else ""
    order: list[str] = []
    for name in GUEST_MODULES:
        if name not in modules:
            if f"/{name}.ko" not in builtin:
                raise GuestBuildError(f"kernel has neither module nor builtin {name}")
            continue
        missing = _modinfo_depends(modules[name]) - set(order)
        # A dependency that is built in needs no loading.
        missing = {d for d in missing if f"/{d}.ko" not in builtin}
        if missing:
            raise GuestBuildError(
                f"module {name} depends on {sorted(missing)} which is not loaded before it; "
                "extend GUEST_MODULES in e2e/harness/guest.py"
            )
        order.append(name)
    return order


def _cpio_newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """Write a cpio "newc" archive: (path, mode, data) entries; symlinks carry the target.

    Written in Python so device nodes (/dev/console, needed before devtmpfs is mounted,
    or init has no stdout) need no mknod on the host and archives are reproducible.
    """
    out = io.BytesIO()

    def pad4() -> None:
        out.write(b"\0" * (-out.tell() % 4))

    ino = 1
    for path, mode, data in [*entries, ("TRAILER!!!", 0, b"")]:
        rdev_major, rdev_minor = (5, 1) if path == "dev/console" else (0, 0)
        name = path.encode() + b"\0"
        header = "070701" + "".join(
            f"{v:08x}"
            for v in (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev_major, rdev_minor, len(name), 0)
        )
        out.write(header.encode())
        out.write(name)
        pad4()
        out.write(data)
        pad4()
        ino += 1
    return out.getvalue()


def _build_initrd(dest: Path, kernel_root: Path) -> None:
    if not _BUSYBOX.is_file():
        raise GuestBuildError(f"{_BUSYBOX} missing: apt-get install busybox-static")
    modules = _find_modules(kernel_root)
    order = _check_module_order(kernel_root, modules)
    d, f, c, ln = 0o040755, 0o100755, 0o020600, 0o120777
    entries: list[tuple[str, int, bytes]] = [
        ("bin", d, b""),
        ("sbin", d, b""),
        ("dev", d, b""),
        ("proc", d, b""),
        ("sys", d, b""),
        ("tmp", d, b""),
        ("lib", d, b""),
        ("lib/modules", d, b""),
        ("dev/console", c, b""),
        ("bin/busybox", f, _BUSYBOX.read_bytes()),
        ("bin/sh", ln, b"busybox"),
        ("init", f, _INIT_SCRIPT.read_bytes()),
        ("lib/modules/load-order", 0o100644, ("\n".join(order) + "\n").encode()),
    ]
    entries += [(f"lib/modules/{n}.ko", 0o100644, modules[n].read_bytes()) for n in order]
    dest.write_bytes(gzip.compress(_cpio_newc(entries), compresslevel=6, mtime=0))


def ensure_guest() -> GuestImage:
    """Build (once) and return the test guest's kernel, initramfs and command line.

    Needs ``apt-get`` access to the Debian archive on the first call for a kernel version;
    later calls are a cache hit (no network, a few milliseconds).
    """
    if not _INIT_SCRIPT.is_file():
        raise GuestBuildError(f"guest init script missing: {_INIT_SCRIPT}")
    package, version = kernel_package()
    digest = hashlib.sha256(
        _INIT_SCRIPT.read_bytes() + _BUILDER_VERSION.encode() + " ".join(GUEST_MODULES).encode()
    ).hexdigest()[:12]
    key = f"{package.removeprefix('linux-image-')}_{version}_{digest}"
    final = cache_root() / "guest" / key
    image = GuestImage(
        final / "vmlinuz", final / "initrd.img", guest_cmdline(), f"{package} {version}"
    )
    if image.kernel.is_file() and image.initrd.is_file():
        return image

    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{key}.", dir=final.parent) as tmp_s:
        tmp = Path(tmp_s)
        # Sandbox user root: the _apt user cannot write into a private temp dir.
        _run(
            ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", f"{package}={version}"],
            cwd=tmp,
        )
        debs = list(tmp.glob("*.deb"))
        if len(debs) != 1:
            raise GuestBuildError(f"apt-get download produced {debs} in {tmp}")
        root = tmp / "root"
        _run(["dpkg-deb", "-x", str(debs[0]), str(root)])
        kernels = list(root.glob("boot/vmlinuz-*"))
        if len(kernels) != 1:
            raise GuestBuildError(f"expected one boot/vmlinuz-* in {debs[0].name}: {kernels}")
        out = tmp / "out"
        out.mkdir()
        shutil.copyfile(kernels[0], out / "vmlinuz")
        _build_initrd(out / "initrd.img", root)
        (out / "KEY").write_text(f"{package} {version}\ninit sha256[:12] {digest}\n")
        try:
            out.rename(final)
        except OSError:
            # A concurrent builder won the race; its result is equivalent.
            if not image.initrd.is_file():
                raise
    return image


def make_blank_disk(path: Path, size_mib: int = 16) -> Path:
    """Create an empty qcow2 image (reads as zeros) at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), f"{size_mib}M"])
    return path


def make_base_image(path: Path, size_mib: int = 16, counter: int | None = None) -> Path:
    """Create a qcow2 "base image" for disk-from-image tests (no backing file).

    It holds zeros, or, with ``counter``, starts with the guest's counter record
    ``VFCOUNTER <n>`` so a VM booted with ``vf.counter=1`` from a disk cloned from this
    image prints ``VF-COUNTER-BOOT <n>``: proof that the image's content was copied.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        raw = Path(tmp) / "base.raw"
        with raw.open("wb") as fh:
            fh.truncate(size_mib * 1024 * 1024)
            if counter is not None:
                fh.write(f"VFCOUNTER {int(counter)}\n".encode())
        _run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(path)])
    return path


def read_disk_counter(path: Path) -> int | None:
    """Read the guest's counter record from a disk image on the host (qcow2 or raw).

    Only valid while no VM is writing the image. Returns None when there is no record.
    """
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "head.raw"
        _run(["qemu-img", "dd", "-O", "raw", "bs=512", "count=1", f"if={path}", f"of={raw}"])
        head = raw.read_bytes().split(b"\n", 1)[0].rstrip(b"\0")
    m = re.fullmatch(rb"VFCOUNTER (\d+)", head)
    return int(m.group(1)) if m else None
