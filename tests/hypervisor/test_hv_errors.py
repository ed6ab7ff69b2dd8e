"""libvirt error codes become the adapter's exception classes."""

from __future__ import annotations

from dataclasses import dataclass

import libvirt
import pytest

from virtfleet.hypervisor import errors


@dataclass
class FakeLibvirtError:
    """Quacks like ``libvirtError`` (whose constructor reads libvirt's last error)."""

    code: int
    domain: int = libvirt.VIR_FROM_NONE
    message: str = "boom"

    def get_error_code(self) -> int:
        return self.code

    def get_error_domain(self) -> int:
        return self.domain

    def get_error_message(self) -> str:
        return self.message


@pytest.mark.parametrize(
    ("code", "domain", "message", "expected"),
    [
        (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_FROM_QEMU, "x", errors.NotFound),
        (libvirt.VIR_ERR_NO_STORAGE_VOL, libvirt.VIR_FROM_STORAGE, "x", errors.NotFound),
        (
            libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT,
            libvirt.VIR_FROM_DOMAIN_SNAPSHOT,
            "x",
            errors.NotFound,
        ),
        (libvirt.VIR_ERR_NO_DOMAIN_METADATA, libvirt.VIR_FROM_DOMAIN, "x", errors.NotFound),
        (libvirt.VIR_ERR_DOM_EXIST, libvirt.VIR_FROM_QEMU, "x", errors.AlreadyExists),
        (libvirt.VIR_ERR_STORAGE_VOL_EXIST, libvirt.VIR_FROM_STORAGE, "x", errors.AlreadyExists),
        (libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_FROM_TEST, "x", errors.Unsupported),
        (
            libvirt.VIR_ERR_INVALID_ARG,
            libvirt.VIR_FROM_TEST,
            "unsupported flags (0x4)",
            errors.Unsupported,
        ),
        (libvirt.VIR_ERR_INVALID_ARG, libvirt.VIR_FROM_TEST, "bad size", errors.HypervisorError),
        (libvirt.VIR_ERR_XML_INVALID_SCHEMA, libvirt.VIR_FROM_XML, "x", errors.InvalidDefinition),
        (libvirt.VIR_ERR_XML_ERROR, libvirt.VIR_FROM_DOMAIN, "x", errors.InvalidDefinition),
        (libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_FROM_QEMU, "x", errors.OperationInvalid),
        (libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_FROM_NONE, "x", errors.ConnectionLost),
        (libvirt.VIR_ERR_INVALID_CONN, libvirt.VIR_FROM_NONE, "x", errors.ConnectionLost),
        (libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_RPC, "x", errors.ConnectionLost),
        (libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_REMOTE, "x", errors.ConnectionLost),
        # An internal error of a driver is not a transport problem.
        (libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_QEMU, "x", errors.HypervisorError),
        (libvirt.VIR_ERR_OPERATION_FAILED, libvirt.VIR_FROM_QEMU, "x", errors.HypervisorError),
        (
            libvirt.VIR_ERR_OPERATION_TIMEOUT,
            libvirt.VIR_FROM_QEMU,
            "Timed out during operation: cannot acquire state change lock",
            errors.JobStuck,
        ),
    ],
)
def test_translate_maps_codes_to_classes(
    code: int, domain: int, message: str, expected: type[errors.HypervisorError]
) -> None:
    translated = errors.translate(FakeLibvirtError(code, domain, message))
    assert type(translated) is expected
    assert (translated.code, translated.domain, translated.message) == (code, domain, message)


def test_real_libvirt_error_is_recognised() -> None:
    conn = libvirt.open("test:///default")
    try:
        with pytest.raises(libvirt.libvirtError) as caught:
            conn.lookupByName("no-such-domain")
    finally:
        conn.close()
    assert errors.is_libvirt_error(caught.value)
    assert isinstance(errors.translate(caught.value), errors.NotFound)


def test_invalid_name_is_also_a_value_error() -> None:
    assert issubclass(errors.InvalidName, ValueError)
    assert issubclass(errors.InvalidName, errors.HypervisorError)
