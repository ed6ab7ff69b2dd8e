"""The node's VMNetworks: observe → decide → act, like every other loop of the agent.

Members are the VMs placed on this node (the agent's cache) and those a VMMigration is
bringing here (so the target's bridge and VXLAN exist before the switch-over); the
VMNetworks and the other nodes' tunnel addresses come from watches. Each pass reads the
host (links, FDB, DHCP servers: :class:`virtfleet.hostnet.HostNetwork`) and the taps of
running domains (libvirt), plans with :func:`virtfleet.reconcile.network_host.plan` and
applies. A pass runs when a member or a network changes, before a VM that needs a
network is made, and every few seconds — which heals drift (a bridge or VXLAN deleted
behind the agent's back: ``NetworkRepaired`` Event on the VMNetwork). What the node has
realised is reported in its VMHost (``status.networks``): a migration's source waits
for it on the target.

The dnsmasq servers run in sessions of their own: an agent restart leaves them, and the
links, as they are (the next pass finds them in order).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final, Protocol

from pydantic import ValidationError

from virtfleet.agent.errors import ActionError
from virtfleet.api.virtualmachine import VirtualMachineSpec
from virtfleet.domain.inputs import AttachedNetwork
from virtfleet.hostnet import HostNetworkError
from virtfleet.identity import Key
from virtfleet.logs import get_logger
from virtfleet.netmodel import LocalNetwork, NetworkAction, ObservedHost, bridge_name
from virtfleet.reconcile import network_host
from virtfleet.reconcile.network_node import (
    NETWORK_PENDING,
    Member,
    NetworkView,
    RunningPort,
    attached_networks,
    attachment_problem,
    cloud_init_network_config,
    desired_networks,
    members_of,
)

if TYPE_CHECKING:
    from virtfleet.agent.agent import Agent

__all__ = ["NETWORK_UNAVAILABLE", "NetworkKeeper", "network_names"]

#: A VM with a VMNetwork NIC on a node that cannot realise networks (no tunnel address,
#: or the host refused the plumbing).
NETWORK_UNAVAILABLE: Final = "NetworkUnavailable"
#: Seconds between passes when nothing asks for one (drift is healed within this).
PASS_SECONDS: Final = 5.0
_TERMINAL_PHASES: Final = frozenset({"Succeeded", "Failed", "Cancelled"})
_COMPONENT: Final = "virtfleet-agent"
_log = get_logger("virtfleet.agent.vmnetworks")


class HostPlumbing(Protocol):
    """What the keeper needs of the node (:class:`virtfleet.hostnet.HostNetwork`)."""

    def observe(self) -> ObservedHost: ...
    def apply(self, actions: list[NetworkAction]) -> dict[int, str]: ...
    def guard(self, peers: Iterable[str], vnis: Iterable[int]) -> bool: ...


class NetworkKeeper:
    """What this node realises of the VMNetworks, and the VMs' view of them."""

    def __init__(self, agent: Agent, host: HostPlumbing | None) -> None:
        self.agent = agent
        self.host = host
        self.node = agent.settings.node_name
        self.tunnel_address = agent.settings.tunnel_address
        self.networks: dict[str, NetworkView] = {}
        self._bodies: dict[str, Mapping[str, Any]] = {}
        #: Other nodes' tunnel addresses, by node name (their VMHost status).
        self.peers: dict[str, str] = {}
        #: VMs a VMMigration brings to this node: migration key → the VM's members
        #: (None until read).
        self.incoming: dict[Key, list[Member] | None] = {}
        #: name → why this node last failed to realise it (one Event per reason).
        self._failures: dict[str, str] = {}
        #: name → VNI of what the last pass realised (reported in the VMHost).
        self.realised: dict[str, int] = {}
        #: What the last heartbeat reported (set by it): a change wakes it early.
        self.reported: dict[str, int] = {}
        self._hurried: dict[str, int] | None = None
        self._changed = asyncio.Event()
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self.log = get_logger("virtfleet.agent.vmnetworks", node=self.node)

    # --- watches ----------------------------------------------------------------------

    def on_network_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        name = str(body["metadata"]["name"])
        if event_type == "DELETED":
            self.networks.pop(name, None)
            self._bodies.pop(name, None)
        else:
            try:
                self.networks[name] = NetworkView.from_body(body)
                self._bodies[name] = body
            except (ValidationError, KeyError, ValueError) as exc:
                self.log.warning("VMNetwork ignored: unreadable", network=name, error=str(exc))
                return
        self.kick()
        for key, cached in list(self.agent.cache.items()):
            if name in network_names(cached):
                self.agent.queue.add(key)  # its addresses or its bridge may have changed

    def on_host_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        name = str(body["metadata"]["name"])
        if name == self.node:
            return
        address = _ipv4(((body.get("status") or {}).get("tunnelAddress")) or None)
        if event_type == "DELETED" or address is None:
            changed = self.peers.pop(name, None) is not None
        else:
            changed = self.peers.get(name) != address
            self.peers[name] = str(address)
        if changed:
            self.kick()

    def on_migration_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        """A VMMigration to this node: its VM's networks come up here before it does."""
        meta, status = body["metadata"], body.get("status") or {}
        key: Key = (str(meta["namespace"]), str(meta["name"]))
        coming = (
            event_type != "DELETED"
            and status.get("targetNode") == self.node
            and status.get("phase") not in _TERMINAL_PHASES
        )
        if not coming:
            if self.incoming.pop(key, None) is not None:
                self.kick()
            return
        if key in self.incoming:
            return
        self.incoming[key] = None  # the VM is read in the pass (it is not in our cache)
        self.kick()

    def kick(self) -> None:
        self._wake.set()

    # --- what the VM loop asks --------------------------------------------------------

    def attach(
        self, namespace: str, uid: str, spec: VirtualMachineSpec
    ) -> dict[str, AttachedNetwork]:
        """Where the VM's VMNetwork NICs plug in; ActionError when one cannot (yet)."""
        if not members_of(namespace, "", uid, spec):
            return {}
        problem = attachment_problem(namespace, uid, spec, self.networks)
        if problem is not None:
            reason, message = problem
            raise ActionError(reason, message, permanent=reason != NETWORK_PENDING)
        if self.host is None or self.tunnel_address is None:
            raise ActionError(
                NETWORK_UNAVAILABLE,
                f"node {self.node} cannot realise VMNetworks: its agent has no "
                "--tunnel-address (chart: the node's address is passed by default)",
                permanent=True,
            )
        return attached_networks(uid, spec, self.networks)

    async def ensure(self, attached: Mapping[str, AttachedNetwork]) -> None:
        """Before a domain that plugs into these bridges is made: they exist."""
        wanted = {a.bridge for a in attached.values()}
        async with self._lock:  # not while a pass that may not know the VM yet runs
            if wanted <= {bridge_name(vni) for vni in self.realised.values()}:
                return
        await self.sync()
        if not wanted <= {bridge_name(vni) for vni in self.realised.values()}:
            raise ActionError(
                NETWORK_UNAVAILABLE,
                f"node {self.node} could not realise the VM's networks yet (see the agent's "
                "log); retried",
                permanent=False,
            )

    def addresses(self, uid: str, spec: VirtualMachineSpec) -> dict[str, str]:
        """NIC name → its address on its VMNetwork (the controller's IPAM record)."""
        out: dict[str, str] = {}
        for member in members_of("", "", uid, spec):
            view = self.networks.get(member.network)
            address = view.addresses.get((uid, member.interface)) if view else None
            if address is not None:
                out[member.interface] = address
        return out

    def network_config(self, uid: str, spec: VirtualMachineSpec) -> str | None:
        """cloud-init network-config for a VM that brings none of its own."""
        if spec.cloud_init is not None and spec.cloud_init.network_data is not None:
            return spec.cloud_init.network_data
        return cloud_init_network_config(uid, spec, self.networks)

    # --- the loop ---------------------------------------------------------------------

    async def run(self) -> None:
        await self._prime()
        while True:
            # No change asked for a pass by then: the periodic one (it heals drift).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), PASS_SECONDS)
            self._wake.clear()
            try:
                await self.sync()
            except Exception as exc:  # the next pass tries again; the loop must live
                self.log.error("VMNetwork pass failed", error=str(exc))

    async def _prime(self) -> None:
        """The VMNetworks and the other nodes as listed now, before the first pass: a pass
        that knew none of them would take every network (and peer) off the node. The
        node's running domains keep theirs anyway (their ports), whatever the VM cache
        holds yet."""
        while True:
            try:
                networks = await self.agent.kube.list("VMNetwork")
                hosts = await self.agent.kube.list("VMHost")
                break
            except Exception as exc:  # no pass before the lists: retry
                self.log.warning("cannot list VMNetworks and VMHosts yet", error=str(exc))
                await asyncio.sleep(PASS_SECONDS)
        for body in networks:
            if str(body["metadata"]["name"]) not in self.networks:
                self.on_network_event("ADDED", body)
        for body in hosts:
            if str(body["metadata"]["name"]) not in self.peers:
                self.on_host_event("ADDED", body)

    async def sync(self) -> None:
        """One pass: observe, plan, apply; repairs are Events on their VMNetwork."""
        if self.host is None or self.tunnel_address is None:
            return
        async with self._lock:
            members = [*self._local_members(), *await self._incoming_members()]
            # Every running domain's XML: only worth reading when a network could use it.
            ports = (
                [
                    RunningPort(p.bridge, p.tap, p.uuid, p.mac)
                    for p in await self.agent.hv.bridge_ports()
                ]
                if self.networks
                else []
            )
            desired = desired_networks(
                members,
                self.networks,
                tunnel_address=self.tunnel_address,
                peers=self.peers.values(),
                ports=ports,
            )
            try:
                repairs, failed = await self._plumb(self.host, desired)
            except HostNetworkError as exc:
                self.log.error("VMNetwork plumbing failed", error=str(exc))
                self._realised({})
                return
            await self._report_repairs(repairs)
            await self._report_failures(desired, failed)
            self._realised({n.name: n.vni for n in desired if n.vni not in failed})

    async def _plumb(
        self, host: HostPlumbing, desired: list[LocalNetwork]
    ) -> tuple[list[NetworkAction], dict[int, str]]:
        """Guard, observe, plan, apply; the actions that repaired drift, and why networks
        failed (by VNI)."""
        loop = asyncio.get_running_loop()
        if desired:
            peers, vnis = sorted(self.peers.values()), [n.vni for n in desired]
            made = await loop.run_in_executor(None, host.guard, peers, vnis)
            if made:
                self.log.info("VMNetwork guard made", peers=peers, vnis=vnis)
        observed = await loop.run_in_executor(None, host.observe)
        actions = network_host.plan(desired, observed)
        if not actions:
            return [], {}
        self.log.info("VMNetwork plumbing", actions=[type(a).__name__ for a in actions])
        failed = await loop.run_in_executor(None, host.apply, actions)
        return [a for a in network_host.repairs(actions) if a.vni not in failed], failed

    def _realised(self, now: dict[str, int]) -> None:
        self.realised = now
        if now != self.reported:
            self._changed.set()

    async def host_changed(self, timeout: float) -> None:
        """Sleep ``timeout``, or less when the realised networks differ from the VMHost's
        (a migration's source waits for its target's)."""
        self._changed.clear()
        if self.realised != self.reported and self.realised != self._hurried:
            self._hurried = dict(self.realised)  # once per change: a failing write waits
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    def _local_members(self) -> list[Member]:
        out: list[Member] = []
        for (namespace, name), body in list(self.agent.cache.items()):
            out += _members(namespace, name, body)
        return out

    async def _incoming_members(self) -> list[Member]:
        out: list[Member] = []
        for key in list(self.incoming):
            members = self.incoming.get(key)
            if members is not None:
                out += members
                continue
            try:
                migration = await self.agent.kube.get("VMMigration", key[0], key[1])
                vm_name = str((migration.get("spec") or {}).get("vmName") or "")
                body = await self.agent.kube.get("VirtualMachine", key[0], vm_name)
            except Exception as exc:  # gone meanwhile, or the API away: next pass
                self.log.info(
                    "incoming VM not read", migration=f"{key[0]}/{key[1]}", error=str(exc)
                )
                continue
            found = _members(key[0], vm_name, body)
            if key in self.incoming:
                self.incoming[key] = found
            out += found
        return out

    async def _report_failures(self, desired: list[LocalNetwork], failed: dict[int, str]) -> None:
        """A network this node cannot realise: a Warning on the VMNetwork, once per
        distinct reason (the pass retries every few seconds)."""
        for network in desired:
            why = failed.get(network.vni)
            if why is None:
                self._failures.pop(network.name, None)
                continue
            if self._failures.get(network.name) == why:
                continue
            self._failures[network.name] = why
            body = self._bodies.get(network.name)
            if body is not None:
                await self.agent.kube.record_event(
                    body, "Warning", "NetworkFailed", f"node {self.node}: {why}", _COMPONENT
                )

    async def _report_repairs(self, repairs: Iterable[NetworkAction]) -> None:
        for action in repairs:
            body = self._bodies.get(action.network)
            self.log.warning("VMNetwork drift repaired", network=action.network, what=action.reason)
            if body is None:
                continue
            await self.agent.kube.record_event(
                body,
                "Warning",
                "NetworkRepaired",
                f"node {self.node}: {action.reason}",
                _COMPONENT,
            )


def _ipv4(text: object) -> str | None:
    """A VMHost's tunnel address, if it is one (a bad one must not break every node)."""
    try:
        return str(ipaddress.IPv4Address(str(text))) if text else None
    except ValueError:
        _log.warning("VMHost tunnelAddress ignored: not an IPv4 address", address=str(text))
        return None


def network_names(body: Mapping[str, Any]) -> set[str]:
    """The VMNetworks a VM body's NICs name (read defensively: the spec may be invalid)."""
    spec = body.get("spec")
    nics = spec.get("interfaces") if isinstance(spec, Mapping) else None
    if not isinstance(nics, list):
        return set()
    return {
        str(nic.get("network"))
        for nic in nics
        if isinstance(nic, Mapping) and nic.get("type") == "network"
    }


def _members(namespace: str, name: str, body: Mapping[str, Any]) -> list[Member]:
    if not network_names(body):
        return []
    try:
        spec = VirtualMachineSpec.model_validate(body.get("spec") or {})
    except ValidationError:
        return []  # the VM loop reports the invalid spec
    return members_of(namespace, name, str(body["metadata"]["uid"]), spec)
