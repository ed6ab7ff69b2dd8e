"""Names and identities shared by every layer.

Kept in one place because they are part of the contract with the cluster and with
libvirt: a change here is a migration for existing fleets.
"""

from __future__ import annotations

import hashlib

API_GROUP = "virtfleet.io"
API_VERSION = "v1alpha1"

#: XML namespace of the ownership element inside a domain's ``<metadata>``.
#: The trailing version lets a future agent read (and upgrade) older markers.
METADATA_NAMESPACE = "https://virtfleet.io/xmlns/domain/v1"
METADATA_PREFIX = "virtfleet"
METADATA_ELEMENT = "owner"
#: ``<metadata>`` namespace of a restore's marker (``hypervisor.snapshots.set_restore_marker``).
RESTORE_MARKER_NAMESPACE = "https://virtfleet.io/xmlns/restore/v1"

#: Label on every placed object; agents filter on it (DESIGN §2).
NODE_LABEL = f"{API_GROUP}/node"
#: Imperative power actions (``virtfleet start|stop|restart|pause|unpause``) are requests
#: in this annotation, ``<action>/<id>``: metadata, so the user's spec is never rewritten.
POWER_REQUEST_ANNOTATION = f"{API_GROUP}/power-request"
POWER_ACTIONS = ("start", "stop", "restart", "pause", "unpause")

#: Finalizers are per node, so that one agent never strips another's (DESIGN §6).
FINALIZER_PREFIX = f"{API_GROUP}/agent-"
#: The controller's finalizer on every VMNetwork: a deleted network stays until no
#: VirtualMachine names it (its VMs' addresses and VNI must not be reused under them).
NETWORK_FINALIZER = f"{API_GROUP}/network-in-use"

#: Derived MACs are locally administered unicast addresses whose first octet ends in ``e``
#: (``0e``, ``1e`` … ``fe``): 44 bits from the uid, so a fleet of 10,000 NICs on one L2
#: has a duplicate with probability ~3·10⁻⁶ (24 bits made one almost certain). The API
#: refuses explicit MACs in that range, so an explicit MAC never equals a derived one.
DERIVED_MAC_LOW_NIBBLE = 0x0E

#: How every loop keys a namespaced object (a VM, a VMMigration): ``(namespace, name)``.
Key = tuple[str, str]


def node_finalizer(node_name: str) -> str:
    """The finalizer an agent on ``node_name`` puts on the objects it holds."""
    return f"{FINALIZER_PREFIX}{node_name}"


def derive_mac(uid: str, interface_name: str) -> str:
    """A stable MAC for an interface, derived from the VM's uid and the NIC name.

    Deriving instead of storing keeps the operator from writing spec (DESIGN §3.1),
    and the same VM gets the same MACs on every node and after every restore.
    """
    digest = hashlib.sha256(f"{uid}/{interface_name}".encode()).digest()
    octets = [(digest[0] & 0xF0) | DERIVED_MAC_LOW_NIBBLE, *digest[1:6]]
    return ":".join(f"{octet:02x}" for octet in octets)


def is_derived_range(mac: str) -> bool:
    """True for MACs virtfleet derives (an explicit MAC there could copy a derived one)."""
    return len(mac) >= 2 and mac[1].lower() == "e"
