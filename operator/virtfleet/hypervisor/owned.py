"""Finding the domains virtfleet owns: those carrying its metadata element.

Everything else is foreign and never returned, so it can never be mutated or
garbage-collected by mistake (DESIGN §3.3).
"""

from __future__ import annotations

from typing import Any

import libvirt
from lxml import etree

from virtfleet.hypervisor import errors

__all__ = ["owned_domains"]


def owned_domains(conn: Any, metadata_ns: str, element: str) -> list[tuple[Any, str]]:
    """Worker thread: ``(virDomain, metadata XML)`` of every domain with ``<element>``.

    Active and inactive domains alike, in one pass over ``listAllDomains``.
    """
    found = []
    for dom in conn.listAllDomains(0):
        try:
            xml = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, metadata_ns, 0)
        except libvirt.libvirtError as exc:
            # No element in our namespace, or the domain vanished mid-scan.
            if isinstance(errors.translate(exc), errors.NotFound):
                continue
            raise
        if _element_name(str(xml)) == element:
            found.append((dom, str(xml)))
    return found


def _element_name(xml: str) -> str | None:
    """Local name of the root element of ``xml`` (libvirt strips the prefix anyway)."""
    try:
        root = etree.fromstring(xml.encode())
    except etree.XMLSyntaxError:
        return None
    return etree.QName(root).localname
