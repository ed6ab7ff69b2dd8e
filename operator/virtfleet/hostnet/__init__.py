"""Host network adapter: the only package that talks netlink (pyroute2) and runs dnsmasq.

It realises a node's VMNetworks — bridge, VXLAN with head-end replication, isolated
ports, a DHCP server per network — from the actions that
:func:`virtfleet.reconcile.network_host.plan` returns, and reports what is there as
:class:`virtfleet.netmodel.ObservedHost`. It decides nothing. Errors arrive as
:class:`HostNetworkError`.

Modules: :mod:`.adapter` (:class:`HostNetwork`), :mod:`.links` (netlink),
:mod:`.dhcp` (dnsmasq's lifecycle). The package itself exports only the error: pyroute2
costs an agent ~24 MiB, so :mod:`.adapter` is imported where a node realises networks.
"""

from virtfleet.hostnet.errors import HostNetworkError

__all__ = ["HostNetworkError"]
