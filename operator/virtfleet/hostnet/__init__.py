"""Host network adapter: the only package that talks netlink (pyroute2) and runs dnsmasq.

It realises a node's VMNetworks — bridge, VXLAN with head-end replication, isolated
ports, a DHCP server per network — from the actions that
:func:`virtfleet.reconcile.network_host.plan` returns, and reports what is there as
:class:`virtfleet.netmodel.ObservedHost`. It decides nothing. Errors arrive as
:class:`HostNetworkError`.

Modules: :mod:`.adapter` (:class:`HostNetwork`), :mod:`.links` (netlink),
:mod:`.dhcp` (dnsmasq's lifecycle).
"""

from virtfleet.hostnet.adapter import DEFAULT_STATE_DIR, HostNetwork
from virtfleet.hostnet.errors import HostNetworkError

__all__ = ["DEFAULT_STATE_DIR", "HostNetwork", "HostNetworkError"]
