"""The node's VMNetwork plumbing: observe it, apply a plan to it.

Synchronous (netlink and process calls are quick; the agent runs it in an executor)
and stateless but for the dnsmasq children it waits for: everything else is read
from the kernel and the state dir on every :meth:`HostNetwork.observe`.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
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
    PlugGateway,
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

    def __init__(
        self,
        state_dir: str | Path = DEFAULT_STATE_DIR,
        netns: str | None = None,
        *,
        local: str | None = None,
        nat_denied: Sequence[str] = (),
    ) -> None:
        self.state_dir = Path(state_dir)
        self.netns = netns
        #: This node's tunnel address, and what its NAT gateways never reach (the guard).
        self.local = local
        self.nat_denied = tuple(nat_denied)
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
        made = ensure_guard(
            self.netns,
            *wanted,
            local=self.local,
            nat_denied=self.nat_denied,
            force=wanted != self._guarded,
        )
        self._guarded = wanted
        return made

    def apply(self, actions: Iterable[NetworkAction]) -> dict[int, str]:
        """Run ``actions`` in order; returns why, by VNI, for the networks that failed.

        A failure stops the rest of *its* network's actions (they build on each other)
        and no other network's: one broken network leaves the others served.
        """
        failed: dict[int, str] = {}
        with ExitStack() as stack:
            try:
                ipr = stack.enter_context(self._ipr())
            except (NetlinkError, OSError) as exc:
                raise HostNetworkError(f"cannot reach the host network: {exc}") from exc
            for action in actions:
                name = type(action).__name__
                if action.vni in failed:
                    continue
                try:
                    self._apply(ipr, action)
                except (HostNetworkError, NetlinkError, OSError, IndexError,
                        subprocess.SubprocessError) as exc:  # fmt: skip
                    failed[action.vni] = f"{name} ({action.reason}): {exc}"
                    _log.error(
                        "host network change failed; the network's other changes wait "
                        "for the next pass",
                        action=name,
                        vni=action.vni,
                        network=action.network,
                        error=str(exc),
                    )
                    continue
                _log.info(
                    "host network changed",
                    action=name,
                    vni=action.vni,
                    network=action.network,
                    reason=action.reason,
                    drift=action.drift,
                )
        return failed

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
                self.dhcp.start(ipr, action)
            case PlugGateway():
                enable_forwarding(self.netns)
                self.dhcp.gateway(ipr, action)
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
