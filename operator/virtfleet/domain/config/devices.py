"""Small devices of the XML object model: serial port, console, memballoon, rng and the
guest agent's channel."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Self

from lxml import etree

from virtfleet.domain.config.base import (
    XmlConfig,
    add_child,
    expect_tag,
    parse_int,
    required_attribute,
    set_attribute,
)


@dataclass(frozen=True, kw_only=True)
class SerialConfig(XmlConfig):
    """``<serial type='pty'>`` with ``<log file=path>``: the guest's first serial port.

    A pty, so ``virtfleet console`` (libvirt's ``virDomainOpenConsole``, which only opens
    ptys) can attach; everything the guest writes also goes to ``path`` on the host.
    ``append`` keeps the log across restarts instead of truncating it at every start.
    Domains made before (``type='file'``) parse with their file as ``path`` — same log,
    no console until they are defined anew; other serial types parse with ``path=None``.
    """

    tag: ClassVar[str] = "serial"

    path: str | None
    append: bool = True
    port: int = 0
    #: ``pty`` (what virtfleet renders) or what a parsed domain has (``file``...).
    kind: str = "pty"

    def _target(self, element: etree._Element) -> None:
        add_child(element, "target", port=self.port)

    def to_xml(self) -> etree._Element:
        element = etree.Element(self.tag)
        set_attribute(element, "type", self.kind)
        append = "on" if self.append else None
        if self.kind == "file":  # a parsed older domain, written back as it was
            add_child(element, "source", path=self.path, append=append)
        else:
            add_child(element, "log", file=self.path, append=append)
        self._target(element)
        return element

    @classmethod
    def parse(cls, element: etree._Element) -> Self:
        expect_tag(element, cls.tag)
        kind = element.get("type")
        # pty: the log file; file (older domains): the file itself.
        holder = element.find("log") if kind == "pty" else element.find("source")
        target = element.find("target")
        path_attribute = "file" if kind == "pty" else "path"
        has_path = kind in ("pty", "file") and holder is not None
        return cls(
            path=holder.get(path_attribute) if has_path and holder is not None else None,
            append=holder is not None and holder.get("append") == "on",
            kind=kind or "",
            port=(parse_int(target.get("port"), "<target port>") or 0) if target is not None else 0,
        )


@dataclass(frozen=True, kw_only=True)
class ConsoleConfig(SerialConfig):
    """``<console>`` bound to serial port 0, so ``virsh console`` and kernels find it."""

    tag: ClassVar[str] = "console"

    def _target(self, element: etree._Element) -> None:
        add_child(element, "target", type="serial", port=self.port)


@dataclass(frozen=True, kw_only=True)
class MemballoonConfig(XmlConfig):
    tag: ClassVar[str] = "memballoon"

    model: str = "virtio"

    def to_xml(self) -> etree._Element:
        element = etree.Element(self.tag)
        set_attribute(element, "model", self.model)
        return element

    @classmethod
    def parse(cls, element: etree._Element) -> Self:
        expect_tag(element, cls.tag)
        return cls(model=required_attribute(element, "model"))


@dataclass(frozen=True, kw_only=True)
class RngConfig(XmlConfig):
    """``<rng>``: a virtio entropy source, so early boot (cloud-init, sshd keys) never waits."""

    tag: ClassVar[str] = "rng"

    model: str = "virtio"
    backend: str = "/dev/urandom"

    def to_xml(self) -> etree._Element:
        element = etree.Element(self.tag)
        set_attribute(element, "model", self.model)
        add_child(element, "backend", self.backend, model="random")
        return element

    @classmethod
    def parse(cls, element: etree._Element) -> Self:
        expect_tag(element, cls.tag)
        backend = element.find("backend")
        return cls(
            model=required_attribute(element, "model"),
            backend=(backend.text or "") if backend is not None else "",
        )


#: The virtio-serial port qemu-guest-agent listens on (libvirt talks to it by this name).
GUEST_AGENT_CHANNEL = "org.qemu.guest_agent.0"


@dataclass(frozen=True, kw_only=True)
class GuestAgentChannelConfig(XmlConfig):
    """``<channel type='unix'>`` to qemu-guest-agent; libvirt picks the socket's path.

    In every domain, as KubeVirt does: a guest that runs no agent never connects, and
    one that does needs nothing else from the manifest.
    """

    tag: ClassVar[str] = "channel"

    def to_xml(self) -> etree._Element:
        element = etree.Element(self.tag)
        set_attribute(element, "type", "unix")
        add_child(element, "source", mode="bind")
        add_child(element, "target", type="virtio", name=GUEST_AGENT_CHANNEL)
        return element

    @classmethod
    def parse(cls, element: etree._Element) -> Self:
        expect_tag(element, cls.tag)
        return cls()

    @staticmethod
    def is_guest_agent(element: etree._Element) -> bool:
        target = element.find("target")
        return target is not None and target.get("name") == GUEST_AGENT_CHANNEL
