"""The node's VMNetwork plumbing: observe it, apply a plan to it.

Synchronous (netlink and process calls are quick; the agent runs it in an executor)
and stateless but for the dnsmasq children it waits for: everything else is read
from the kernel and the state dir on every :meth:`HostNetwork.observe`.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

from pyroute2.netlink.exceptions import NetlinkError

from virtfleet.hostnet import links
from virtfleet.hostnet.dhcp import DhcpServers
from virtfleet.hostnet.errors import HostNetworkError
from virtfleet.hostnet.gateway import enable_forwarding
from virtfleet.hostnet.guard import ensure_guard
from virtfleet.hostnet.netns import iproute
from virtfleet.logs import get_logger
from virtfleet.netmodel import (
    EnsureBridge,
    EnsurePort,
    EnsureVxlan,
    NetworkAction,
    ObservedHost,
    ReloadDhcp,
    RemoveNetwork,
    SetFloodPeers,
    StartDhcp,
    StopDhcp,
)

#: tmpfs: a rebooted node starts without stale servers, as its links are gone too.
DEFAULT_STATE_DIR: Final = "/run/virtfleet/networks"

_log = get_logger("virtfleet.hostnet")


class HostNetwork:
    """Bridges, VXLANs and DHCP servers of one node.

    ``state_dir`` holds dnsmasq's files: one per node (the e2e harness runs several
    agents on one host). ``netns`` (a path such as ``/proc/<pid>/ns/net``) works on
    another network namespace than the process's own: what the tests use.
    """

    def __init__(self, state_dir: str | Path = DEFAULT_STATE_DIR, netns: str | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.netns = netns
        self.dhcp = DhcpServers(self.state_dir)
        #: The peers and VNIs the guard was last made with.
        self._guarded: tuple[tuple[str, ...], tuple[int, ...]] | None = None

    def observe(self) -> ObservedHost:
        try:
            with self._ipr() as ipr:
                found = links.observe_links(ipr)
                flood = links.observe_flood(ipr, found)
            servers = self.dhcp.observe()
        except (NetlinkError, OSError) as exc:
            raise HostNetworkError(f"cannot observe the host network: {exc}") from exc
        return ObservedHost(links=found, flood=flood, dhcp=servers)

    def guard(self, peers: Iterable[str], vnis: Iterable[int]) -> bool:
        """The node's guard (:mod:`virtfleet.hostnet.guard`): its VMs kept off it, VXLAN
        of our VNIs only from ``peers``; True when it had to be made (first time, peers or
        VNIs changed, or flushed behind the agent's back)."""
        wanted = (tuple(sorted(set(peers))), tuple(sorted(set(vnis))))
        made = ensure_guard(self.netns, *wanted, force=wanted != self._guarded)
        self._guarded = wanted
        return made

    def apply(self, actions: Iterable[NetworkAction]) -> None:
        """Run ``actions`` in order; the first failure stops and raises."""
        with self._ipr() as ipr:
            for action in actions:
                name = type(action).__name__
                try:
                    self._apply(ipr, action)
                except (NetlinkError, OSError, subprocess.SubprocessError) as exc:
                    raise HostNetworkError(
                        f"{name} for VNI {action.vni} ({action.reason}): {exc}"
                    ) from exc
                _log.info(
                    "host network changed",
                    action=name,
                    vni=action.vni,
                    network=action.network,
                    reason=action.reason,
                    drift=action.drift,
                )

    def _apply(self, ipr: Any, action: NetworkAction) -> None:
        match action:
            case EnsureBridge():
                links.ensure_bridge(ipr, action)
            case EnsureVxlan():
                links.ensure_vxlan(ipr, action)
            case EnsurePort():
                links.ensure_port(ipr, action)
            case SetFloodPeers():
                links.set_flood_peers(ipr, action)
            case StartDhcp():
                if action.nat is not None:
                    enable_forwarding(self.netns)
                self.dhcp.start(ipr, action)
            case ReloadDhcp():
                self.dhcp.reload(action)
            case StopDhcp():
                self.dhcp.stop(ipr, action.vni, remove_state=True)
            case RemoveNetwork():
                if action.dhcp:
                    self.dhcp.stop(ipr, action.vni, remove_state=True)
                for name in action.links:
                    links.delete_link(ipr, name)

    @contextmanager
    def _ipr(self) -> Iterator[Any]:
        with iproute(self.netns) as ipr:
            yield ipr
