"""Fleet-wide MAC uniqueness: a VM may not take a MAC another VM already uses.

Derived MACs come from a range users cannot write (the API refuses explicit MACs whose
first octet ends in ``e``), so only explicit MACs can collide. Copying another VM's MAC
on a shared L2 steals its traffic; the later VM is not placed (``MacAddressConflict``,
Stalled) until the MAC is free or changed. Pure: the controller's cache keeps the index.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from virtfleet.identity import Key
from virtfleet.reconcile.views import CachedVm

__all__ = ["MacIndex", "explicit_macs"]


def explicit_macs(spec: Mapping[str, Any]) -> dict[str, str]:
    """``{mac: interface name}`` of the interfaces that set ``macAddress`` (lowercased)."""
    out: dict[str, str] = {}
    for nic in spec.get("interfaces") or ():
        if isinstance(nic, Mapping) and isinstance(nic.get("macAddress"), str):
            out[nic["macAddress"].lower()] = str(nic.get("name") or "")
    return out


def _age_key(vm: CachedVm) -> tuple[str, str, str]:
    created = (vm.body.get("metadata") or {}).get("creationTimestamp") or ""
    return (str(created), vm.namespace, vm.name)


class MacIndex:
    """Which VMs claim each explicit MAC."""

    def __init__(self) -> None:
        self._claims: dict[str, set[Key]] = {}
        self._by_vm: dict[Key, frozenset[str]] = {}

    def update(self, key: Key, macs: Iterable[str]) -> None:
        self.remove(key)
        wanted = frozenset(macs)
        if wanted:
            self._by_vm[key] = wanted
            for mac in wanted:
                self._claims.setdefault(mac, set()).add(key)

    def remove(self, key: Key) -> None:
        for mac in self._by_vm.pop(key, ()):
            claimants = self._claims.get(mac)
            if claimants is not None:
                claimants.discard(key)
                if not claimants:
                    del self._claims[mac]

    def __len__(self) -> int:
        return len(self._claims)

    def conflict(self, vm: CachedVm, vms: Mapping[Key, CachedVm]) -> str | None:
        """Why ``vm`` may not be placed, or ``None``.

        The older VM (or the one already placed) keeps the MAC; another namespace's VM is
        not named, so the message does not tell a tenant about other tenants.
        """
        for mac, nic in sorted(explicit_macs(vm.body.get("spec") or {}).items()):
            for other_key in sorted(self._claims.get(mac, set()) - {vm.key}):
                other = vms.get(other_key)
                if other is None or other.deleting:
                    continue
                if other.node_name is None and _age_key(other) > _age_key(vm):
                    continue  # the newer one waits, not us
                who = f"VM {other.name}" if other.namespace == vm.namespace else "another VM"
                return (
                    f"interface {nic}: macAddress {mac} is already used by {who}; "
                    "choose another macAddress or leave it unset (a unique one is derived)"
                )
        return None
