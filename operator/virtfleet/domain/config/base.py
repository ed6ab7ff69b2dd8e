"""The base of the XML object model: :class:`XmlConfig` and the helpers every element uses.

Every string written goes through :func:`set_attribute` / :func:`add_child`, hence through
:func:`xml_safe`; every document read goes through :func:`parse_xml`, which refuses
entities, DTDs and network access.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from typing import ClassVar, Final, Self

from lxml import etree

from virtfleet.domain.errors import MalformedDomainError, UnsafeValueError

#: Characters a domain XML cannot carry *unchanged through libvirt*: everything outside
#: XML 1.0's ``Char`` production (no escaping can carry NUL: ``&#0;`` is not well-formed),
#: and CR, which libvirt writes back unescaped so that every XML parser reads it as LF —
#: the stored value would then differ from the applied one forever (endless drift).
#: Refused, never dropped or rewritten silently.
_NOT_XML_CHAR = re.compile("[^\t\n\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def xml_safe(value: str, what: str) -> str:
    """Return ``value`` if XML can carry it unchanged, else raise :class:`UnsafeValueError`."""
    bad = _NOT_XML_CHAR.search(value)
    if bad is not None:
        raise UnsafeValueError(
            f"{what} contains the character {bad.group()!r} at offset {bad.start()}, "
            "which a libvirt domain XML cannot carry unchanged"
        )
    return value


_PARSER: Final = etree.XMLParser(
    resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False, remove_blank_text=True
)


def parse_xml(document: str | bytes) -> etree._Element:
    """Parse a domain XML (e.g. from ``XMLDesc``) without entities, DTDs or network access."""
    data = document.encode() if isinstance(document, str) else document
    try:
        root = etree.fromstring(data, _PARSER)
    except etree.XMLSyntaxError as exc:
        raise MalformedDomainError(f"not well-formed XML: {exc}") from exc
    if getattr(root.getroottree().docinfo, "doctype", ""):
        raise MalformedDomainError("a domain XML with a DOCTYPE is refused")
    return root


def set_attribute(element: etree._Element, attribute: str, value: str | int | None) -> None:
    """Set ``attribute`` through :func:`xml_safe`; ``None`` leaves it out."""
    if value is None:
        return
    text = str(value)
    element.set(attribute, xml_safe(text, f"<{element.tag} {attribute}>"))


def add_child(
    parent: etree._Element,
    tag: str,
    text: str | int | None = None,
    **attributes: str | int | None,
) -> etree._Element:
    """Append ``<tag>`` with checked attributes (``None`` ones left out) and text."""
    child = etree.SubElement(parent, tag)
    for name, value in attributes.items():
        set_attribute(child, name, value)
    if text is not None:
        child.text = xml_safe(str(text), f"<{tag}> text")
    return child


def parse_int(raw: str | None, where: str) -> int | None:
    """An integer attribute or text; ``where`` names it in the error."""
    if raw is None:
        return None
    try:
        return int(raw.strip())
    except ValueError as exc:
        raise MalformedDomainError(f"{where}: {raw!r} is not an integer") from exc


def required_attribute(element: etree._Element, attribute: str) -> str:
    """An attribute without which the element is unusable."""
    value = element.get(attribute)
    if value is None:
        raise MalformedDomainError(f"<{element.tag}> lacks the {attribute!r} attribute")
    return value


def text_of(element: etree._Element | None) -> str | None:
    """The text of an optional child: ``None`` when absent, ``""`` when empty."""
    if element is None:
        return None
    return element.text or ""


def expect_tag(element: etree._Element, tag: str) -> None:
    """Refuse to parse an element of another kind."""
    if element.tag != tag:
        raise MalformedDomainError(f"expected <{tag}>, found <{element.tag}>")


class XmlConfig(ABC):
    """One XML element as a value: build it with ``to_xml``, read it back with ``parse``."""

    tag: ClassVar[str]

    @abstractmethod
    def to_xml(self) -> etree._Element:
        """A fresh element tree (the caller may attach it anywhere)."""

    @classmethod
    @abstractmethod
    def parse(cls, element: etree._Element) -> Self:
        """Read an element; raises :class:`MalformedDomainError` on a shape we cannot use."""

    def to_string(self) -> str:
        return etree.tostring(self.to_xml(), encoding="unicode", pretty_print=True)
