"""Exceptions of the hypervisor adapter.

Upper layers (reconcile, agent) branch on *what went wrong*, never on libvirt's error
codes: they must not import ``libvirt`` at all. So every ``libvirtError`` that leaves this
package is translated here, in one table, into a small hierarchy. The original error is
kept as ``__cause__`` and its code/domain/message on the exception for logs.
"""

from __future__ import annotations

from typing import Any

import libvirt

__all__ = [
    "AlreadyExists",
    "ConnectionLost",
    "HypervisorError",
    "InvalidDefinition",
    "InvalidName",
    "JobStuck",
    "NotFound",
    "OperationInvalid",
    "UnsafeImage",
    "Unsupported",
    "is_libvirt_error",
    "translate",
]


class HypervisorError(Exception):
    """Base of every error raised by :mod:`virtfleet.hypervisor`.

    ``code`` and ``domain`` are libvirt's ``virErrorNumber``/``virErrorDomain`` (``None``
    when the error did not come from libvirt); they are for logs and events only.
    """

    def __init__(self, message: str, *, code: int | None = None, domain: int | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.domain = domain


class NotFound(HypervisorError):  # noqa: N818 - names read as outcomes
    """The domain, pool, volume or snapshot does not exist (any more)."""


class AlreadyExists(HypervisorError):  # noqa: N818 - names read as outcomes
    """An object with this name or UUID exists already (possibly with another shape)."""


class ConnectionLost(HypervisorError):  # noqa: N818 - names read as outcomes
    """libvirtd is unreachable or the connection broke; retry after the reconnect."""


class OperationInvalid(HypervisorError):  # noqa: N818 - names read as outcomes
    """The object is in the wrong state for the operation (e.g. start a running domain)."""


class Unsupported(HypervisorError):  # noqa: N818 - names read as outcomes
    """The driver/hypervisor does not implement the call or one of its flags."""


class InvalidDefinition(HypervisorError):  # noqa: N818 - names read as outcomes
    """libvirt rejected an XML document (malformed, schema-invalid or semantically wrong)."""


class InvalidName(HypervisorError, ValueError):  # noqa: N818 - names read as outcomes
    """A pool/volume/snapshot name that could escape its directory or is otherwise unsafe."""


class JobStuck(HypervisorError):  # noqa: N818 - names read as outcomes
    """libvirtd timed out waiting for the domain's job lock ("cannot acquire state change lock").

    Usually brief (another call is busy), but libvirt 9 keeps a job *without owner* when
    libvirtd dies while it starts a domain or reverts a snapshot: then every later call
    on that domain times out until libvirtd is restarted.
    """


class UnsafeImage(HypervisorError):  # noqa: N818 - names read as outcomes
    """An image volume that must not be used as a backing store (e.g. it has its own)."""


# libvirt error numbers, by the class they become. Read from the module so that a
# renumbering in a future binding cannot silently break the table.
_NOT_FOUND = {
    libvirt.VIR_ERR_NO_DOMAIN,
    libvirt.VIR_ERR_NO_STORAGE_POOL,
    libvirt.VIR_ERR_NO_STORAGE_VOL,
    libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT,
    libvirt.VIR_ERR_NO_DOMAIN_METADATA,
    libvirt.VIR_ERR_NO_NETWORK,
}
_ALREADY_EXISTS = {libvirt.VIR_ERR_DOM_EXIST, libvirt.VIR_ERR_STORAGE_VOL_EXIST}
_UNSUPPORTED = {
    libvirt.VIR_ERR_NO_SUPPORT,
    libvirt.VIR_ERR_OPERATION_UNSUPPORTED,
    libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED,
    libvirt.VIR_ERR_CONFIG_UNSUPPORTED,
}
_INVALID_DEFINITION = {libvirt.VIR_ERR_XML_ERROR, libvirt.VIR_ERR_XML_INVALID_SCHEMA}
_OPERATION_INVALID = {libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_ERR_SNAPSHOT_REVERT_RISKY}
_CONNECTION_CODES = {libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_INVALID_CONN}
# System/internal/RPC errors mean a broken connection only when they come from the
# transport, as OpenStack Nova's ``host.py`` also distinguishes.
_TRANSPORT_CODES = {
    libvirt.VIR_ERR_SYSTEM_ERROR,
    libvirt.VIR_ERR_INTERNAL_ERROR,
    libvirt.VIR_ERR_RPC,
}
_TRANSPORT_DOMAINS = {libvirt.VIR_FROM_REMOTE, libvirt.VIR_FROM_RPC}


def is_libvirt_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a raw ``libvirtError`` (for the few places that catch broadly)."""
    return isinstance(exc, libvirt.libvirtError)


def _class_for(code: int | None, domain: int | None, message: str) -> type[HypervisorError]:
    if code in _NOT_FOUND:
        return NotFound
    if code in _ALREADY_EXISTS:
        return AlreadyExists
    if code in _UNSUPPORTED:
        return Unsupported
    # virCheckFlags() reports an unknown flag as INVALID_ARG "unsupported flags (0x..)";
    # callers that fall back to fewer flags need to tell that apart from a bad argument.
    if code == libvirt.VIR_ERR_INVALID_ARG and message.startswith("unsupported flags"):
        return Unsupported
    if code in _INVALID_DEFINITION:
        return InvalidDefinition
    if code in _OPERATION_INVALID:
        return OperationInvalid
    if code == libvirt.VIR_ERR_OPERATION_TIMEOUT:
        return JobStuck
    if code in _CONNECTION_CODES or (code in _TRANSPORT_CODES and domain in _TRANSPORT_DOMAINS):
        return ConnectionLost
    return HypervisorError


def translate(exc: Any) -> HypervisorError:
    """The :class:`HypervisorError` for a ``libvirtError`` (raise it ``from exc``)."""
    code = exc.get_error_code()
    domain = exc.get_error_domain()
    message = exc.get_error_message() or str(exc)
    return _class_for(code, domain, message)(message, code=code, domain=domain)
