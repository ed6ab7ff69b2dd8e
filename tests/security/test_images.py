"""User images are inspected before use: backing files, data files and lying names refused.

The images are real files made by ``qemu-img`` in tmp_path, the way an attacker would
craft them (a qcow2 whose backing file is /etc/shadow is a one-liner); the agent's own
header parser must agree with qemu-img about each of them.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from virtfleet.hypervisor import UnsafeImage, images

MiB = 1024 * 1024


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def qcow2(path: Path, *extra: str, size: str = "4M") -> Path:
    qemu_img("create", "-f", "qcow2", *extra, str(path), size)
    return path


def test_plain_qcow2_and_raw_are_accepted(tmp_path: Path) -> None:
    info = images.inspect(str(qcow2(tmp_path / "disk.qcow2")))
    assert (info.format, info.virtual_size) == ("qcow2", 4 * MiB)
    raw = tmp_path / "disk.img"
    raw.write_bytes(b"\0" * MiB)
    assert images.inspect(str(raw)).format == "raw"


def test_backing_file_to_a_host_file_is_refused(tmp_path: Path) -> None:
    evil = qcow2(tmp_path / "evil.qcow2", "-F", "raw", "-b", "/etc/shadow", "-u", size="1M")
    with pytest.raises(UnsafeImage, match=r"has a backing file \(/etc/shadow\)"):
        images.inspect(str(evil))


def test_external_data_file_is_refused(tmp_path: Path) -> None:
    evil = qcow2(
        tmp_path / "data.qcow2", "-o", f"data_file={tmp_path / 'elsewhere.raw'}", size="1M"
    )
    with pytest.raises(UnsafeImage, match="external data file; refused"):
        images.inspect(str(evil))


def test_raw_file_named_qcow2_is_refused(tmp_path: Path) -> None:
    liar = tmp_path / "ubuntu.qcow2"
    liar.write_bytes(b"\0" * MiB)
    with pytest.raises(UnsafeImage, match="named like a qcow2 image but its content is raw"):
        images.inspect(str(liar))


def test_qcow2_named_raw_is_refused(tmp_path: Path) -> None:
    liar = qcow2(tmp_path / "disk.raw")
    with pytest.raises(UnsafeImage, match="named like a raw image but its content is qcow2"):
        images.inspect(str(liar))


@pytest.mark.parametrize(("fmt", "shown"), [("vmdk", "vmdk"), ("vpc", "vpc"), ("qed", "qed")])
def test_other_formats_are_refused_not_taken_as_raw(tmp_path: Path, fmt: str, shown: str) -> None:
    other = tmp_path / "disk.img"
    qemu_img("create", "-f", fmt, str(other), "1M")
    with pytest.raises(UnsafeImage, match=f"has format '{shown}'; use qcow2 or raw"):
        images.inspect(str(other))


def test_encrypted_qcow2_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret.qcow2"
    # QEMU times PBKDF2 with the thread's CPU clock and gives up ("Unable to get accurate
    # CPU usage") when a round took less than a tick, which happens now and then; retry.
    for attempt in range(20):
        try:
            qemu_img(
                "create", "-f", "qcow2", "--object", "secret,id=s0,data=abc",
                "-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
                str(secret), "1M",
            )  # fmt: skip
            break
        except subprocess.CalledProcessError:
            secret.unlink(missing_ok=True)
            if attempt == 19:
                raise
    with pytest.raises(UnsafeImage, match="encrypted"):
        images.inspect(str(secret))


@pytest.mark.parametrize("version", ["0.10", "1.1"])
def test_parser_agrees_with_qemu_img(tmp_path: Path, version: str) -> None:
    path = qcow2(tmp_path / "v.qcow2", "-o", f"compat={version}", size="7M")
    report = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(path)],
            capture_output=True, text=True, check=True,
        ).stdout
    )  # fmt: skip
    info = images.inspect(str(path))
    assert (info.format, info.virtual_size) == (report["format"], report["virtual-size"])


def test_truncated_header_is_refused() -> None:
    with pytest.raises(UnsafeImage, match="truncated"):
        images.inspect_header(images.QCOW2_MAGIC + b"\0\0\0\3", 8, "x.qcow2")


def test_unreadable_file_is_refused_with_a_reason(tmp_path: Path) -> None:
    with pytest.raises(UnsafeImage, match="could not be read: No such file"):
        images.inspect(str(tmp_path / "absent.qcow2"))


@pytest.mark.parametrize(
    ("name", "fmt", "ok"),
    [
        ("a.qcow2", "qcow2", True),
        ("a.QCOW2", "raw", False),
        ("a.img", "qcow2", True),  # cloud images: .img is either
        ("a.img", "raw", True),
        ("a.raw", "raw", True),
        ("a", "raw", True),
        ("a.raw", None, False),
    ],
)
def test_name_and_format(name: str, fmt: str | None, ok: bool) -> None:
    if ok:
        images.check_name_matches_format(name, fmt)
    else:
        with pytest.raises(UnsafeImage):
            images.check_name_matches_format(name, fmt)
