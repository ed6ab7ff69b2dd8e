"""Errors of the domain layer.

All are ``ValueError``s: they describe bad *data* (an input the builder refuses, an XML
it cannot read), never a libvirt failure, so the agent can turn them into a ``Stalled``
condition with the message as it is instead of retrying.
"""

from __future__ import annotations

__all__ = ["DomainError", "InvalidInputError", "MalformedDomainError", "UnsafeValueError"]


class DomainError(ValueError):
    """Base class: the domain layer refuses an input or cannot read a document."""


class InvalidInputError(DomainError):
    """The spec or the node's resolved resources cannot be turned into a domain."""


class UnsafeValueError(InvalidInputError):
    """A string that XML cannot carry faithfully (NUL, other control characters)."""


class MalformedDomainError(DomainError):
    """A domain XML (or our marker in it) that does not have the shape we need."""
