"""A real Debian guest for end-to-end tests: bookworm with systemd, cloud-init,
openssh-server and qemu-guest-agent, built from Debian packages with mmdebstrap.

Why build rather than download a cloud image: packages come from the Debian archive (the
only source this machine reaches), and the build is reproducible from this file. The
root filesystem is made without a loop device or a bootloader: mmdebstrap unpacks into a
directory, ``mkfs.ext4 -d`` turns it into an image, and the guest boots the image's own
kernel and initramfs directly (``spec.kernel``), ``root=/dev/vda``. What a user's cloud
image has and this one lacks is only GRUB.

The result is cached under ``${VIRTFLEET_CACHE:-~/.cache/virtfleet}/debian/<key>/``,
keyed by this builder, its package list and the kernel package version apt knows (a new
kernel is a new image): ``disk.qcow2``, ``vmlinuz``, ``initrd.img``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.guest import GuestBuildError, cache_root, kernel_package

__all__ = [
    "DEBIAN_CMDLINE",
    "DEBIAN_DISK_VOLUME",
    "DEBIAN_INITRD_VOLUME",
    "DEBIAN_KERNEL_VOLUME",
    "DebianImage",
    "debian_vm",
    "ensure_debian",
    "place",
]

SUITE = "bookworm"
PACKAGES = (
    "systemd-sysv",
    "udev",
    "dbus",
    "linux-image-cloud-amd64",
    "initramfs-tools",
    "cloud-init",
    "openssh-server",
    "qemu-guest-agent",
    "ifupdown",
    "isc-dhcp-client",
    "iproute2",
    "iputils-ping",
    "netbase",
    "sudo",
    "procps",
)
#: Names in the nodes' image store.
DEBIAN_DISK_VOLUME = "debian-12.qcow2"
DEBIAN_KERNEL_VOLUME = "debian-12-vmlinuz"
DEBIAN_INITRD_VOLUME = "debian-12-initrd.img"
#: The guest's kernel command line: its root, and its console on the serial port (where
#: systemd also starts a getty, the one ``virtfleet console`` reaches).
DEBIAN_CMDLINE = "root=/dev/vda rw console=ttyS0 net.ifnames=0"
#: The root filesystem's size (the image's virtual size; a VM's disk is at least this).
DISK_SIZE = "3G"
_BUILDER_VERSION = "1"

#: Files written into the root before the filesystem is made.
_FILES: dict[str, str] = {
    "etc/fstab": "/dev/vda / ext4 defaults,discard,errors=remount-ro 0 1\n",
    # Only the seed virtfleet attaches: probing for EC2, GCE... costs minutes under TCG.
    "etc/cloud/cloud.cfg.d/90-virtfleet.cfg": "datasource_list: [NoCloud, None]\n",
    "etc/network/interfaces": "auto lo\niface lo inet loopback\n"
    "source /etc/network/interfaces.d/*\n",
    # Each VM makes its own (systemd's first boot): never a copy of the builder's.
    "etc/machine-id": "",
    "etc/hostname": "debian\n",
}
#: Units that only slow a test guest down (timers of apt and man-db, fsck of a fresh fs).
_MASKED = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "man-db.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "systemd-fsck-root.service",
)


@dataclass(frozen=True)
class DebianImage:
    disk: Path
    kernel: Path
    initrd: Path
    key: str
    #: Seconds the build took (0 for a cache hit), for the log.
    built_in: float = 0.0


def _key() -> str:
    package, version = kernel_package()
    recipe = "\n".join(
        [_BUILDER_VERSION, SUITE, *PACKAGES, repr(sorted(_FILES.items())), *_MASKED, DISK_SIZE,
         package, version]
    )  # fmt: skip
    return f"{SUITE}_{version}_{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"


def ensure_debian() -> DebianImage:
    """Build (once) and return the Debian guest; later calls are a cache hit."""
    key = _key()
    final = cache_root() / "debian" / key
    image = DebianImage(final / "disk.qcow2", final / "vmlinuz", final / "initrd.img", key)
    if all(p.is_file() for p in (image.disk, image.kernel, image.initrd)):
        return image
    started = time.monotonic()
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{key}.", dir=final.parent) as tmp_s:
        tmp = Path(tmp_s)
        root = tmp / "root"
        _run(
            [
                "mmdebstrap",
                "--mode=root",
                "--variant=minbase",
                f"--include={','.join(PACKAGES)}",
                "--aptopt=Acquire::Retries=3",
                # No recommends: a test guest needs none of them (and boots faster).
                "--aptopt=APT::Install-Recommends=false",
                "--dpkgopt=path-exclude=/usr/share/{doc,man,locale}/*",
                SUITE,
                str(root),
                "deb http://deb.debian.org/debian bookworm main",
                "deb http://deb.debian.org/debian bookworm-updates main",
                "deb http://deb.debian.org/debian-security bookworm-security main",
            ],
            timeout=1800,
        )
        _customize(root)
        out = tmp / "out"
        out.mkdir()
        _boot_files(root, out)
        raw = tmp / "disk.raw"
        _run(["mkfs.ext4", "-q", "-L", "root", "-d", str(root), str(raw), DISK_SIZE])
        _run(
            [
                "qemu-img",
                "convert",
                "-q",
                "-f",
                "raw",
                "-O",
                "qcow2",
                str(raw),
                str(out / "disk.qcow2"),
            ]
        )
        (out / "KEY").write_text(f"{key}\n{' '.join(PACKAGES)}\n")
        try:
            out.rename(final)
        except OSError:
            if not image.disk.is_file():  # a concurrent builder won: its result is equal
                raise
    return DebianImage(image.disk, image.kernel, image.initrd, key, time.monotonic() - started)


def _customize(root: Path) -> None:
    for relative, text in _FILES.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    masked = root / "etc/systemd/system"
    masked.mkdir(parents=True, exist_ok=True)
    for unit in _MASKED:
        target = masked / unit
        target.unlink(missing_ok=True)
        target.symlink_to("/dev/null")
    # Host keys come per VM (cloud-init's ssh module makes them on first boot).
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)
    (root / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)


def _boot_files(root: Path, out: Path) -> None:
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    initrds = sorted((root / "boot").glob("initrd.img-*"))
    if len(kernels) != 1 or len(initrds) != 1:
        raise GuestBuildError(f"expected one kernel and one initrd in /boot: {kernels} {initrds}")
    shutil.copyfile(kernels[0], out / "vmlinuz")
    shutil.copyfile(initrds[0], out / "initrd.img")
    os.chmod(out / "initrd.img", 0o644)


def _run(cmd: list[str], *, timeout: float = 600) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as exc:
        raise GuestBuildError(f"{cmd[0]} not found: scripts/bootstrap installs it") from exc
    if proc.returncode != 0:
        raise GuestBuildError(
            f"command failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}"
        )


def debian_vm(name: str, namespace: str, **spec: Any) -> dict[str, Any]:
    """A VirtualMachine that boots the Debian guest from the image store (1 GiB)."""
    body: dict[str, Any] = {
        "memory": {"size": "1Gi"},
        "kernel": {
            "image": DEBIAN_KERNEL_VOLUME,
            "initrd": DEBIAN_INITRD_VOLUME,
            "cmdline": DEBIAN_CMDLINE,
        },
        "disks": [{"name": "root", "source": {"image": DEBIAN_DISK_VOLUME}}],
        "terminationGracePeriodSeconds": 60,
        **spec,
    }
    return {
        "apiVersion": "virtfleet.io/v1alpha1",
        "kind": "VirtualMachine",
        "metadata": {"name": name, "namespace": namespace},
        "spec": body,
    }


def place(image: DebianImage, images_dir: Path) -> None:
    """Put the guest into a node's image store (``images_dir``): hard links when the
    cache is on the same filesystem (instant, no space), else a copy once."""
    for source, name in (
        (image.disk, DEBIAN_DISK_VOLUME),
        (image.kernel, DEBIAN_KERNEL_VOLUME),
        (image.initrd, DEBIAN_INITRD_VOLUME),
    ):
        target = images_dir / name
        if target.exists() and os.path.samestat(target.stat(), source.stat()):
            continue
        staged = target.with_name(f".{name}.tmp")
        staged.unlink(missing_ok=True)
        try:
            os.link(source, staged)
        except OSError:  # another filesystem
            if target.exists() and target.stat().st_size == source.stat().st_size:
                continue  # copied before: the cache key names the content
            shutil.copyfile(source, staged)
        staged.replace(target)
