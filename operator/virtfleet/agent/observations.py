"""What observing a VM's domain computed, kept until its XML or its inputs change.

Every resync observes every VM of the node: the desired domain built (twice: once to
refuse a spec that cannot be rendered), both XML dumps parsed, and two diffs. At steady
state none of that changes between resyncs; in the fleet profile (20 nodes) it was
~40 % of an agent's busy CPU. The libvirt calls still happen every time — the node is
read afresh — only the parsing, building and diffing are skipped while the XML text
(by digest) and the inputs are the ones last seen. ``build_domain`` is a pure function
of the inputs, and ``observe``/``diff`` of their arguments, so a kept result is exactly
what computing it again would give.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from virtfleet.domain import DomainInputs, build_domain, diff, observe
from virtfleet.domain.diff import DomainDiff
from virtfleet.domain.observe import ObservedDomain, observe_config


def digest(xml: str) -> bytes:
    return hashlib.blake2b(xml.encode(), digest_size=16).digest()


@dataclass(frozen=True)
class Inactive:
    """The persistent definition against what the inputs render."""

    inputs: DomainInputs
    xml_digest: bytes
    observed: ObservedDomain
    desired: ObservedDomain
    drift: DomainDiff


@dataclass(frozen=True)
class _Running:
    desired: ObservedDomain
    xml_digest: bytes
    changes: DomainDiff


class ObservationMemo:
    """Per VM uid, the last inactive and running comparison; at most one entry each."""

    def __init__(self) -> None:
        self._inactive: dict[str, Inactive] = {}
        self._running: dict[str, _Running] = {}

    def __len__(self) -> int:
        return len(self._inactive)

    def rendered(self, uid: str, inputs: DomainInputs) -> bool:
        """These inputs rendered before (so they render: no need to try again)."""
        seen = self._inactive.get(uid)
        return seen is not None and seen.inputs == inputs

    def inactive(self, uid: str, inputs: DomainInputs, xml: str) -> Inactive:
        key = digest(xml)
        seen = self._inactive.get(uid)
        if seen is not None and seen.xml_digest == key and seen.inputs == inputs:
            return seen
        observed = observe(xml)
        desired = observe_config(build_domain(inputs))
        seen = Inactive(inputs, key, observed, desired, diff(desired, observed))
        self._inactive[uid] = seen
        return seen

    def running(self, uid: str, desired: ObservedDomain, xml: str) -> DomainDiff:
        """``desired`` is :attr:`Inactive.desired`: the same object while the inputs are."""
        key = digest(xml)
        seen = self._running.get(uid)
        if seen is not None and seen.desired is desired and seen.xml_digest == key:
            return seen.changes
        changes = diff(desired, observe(xml))
        self._running[uid] = _Running(desired, key, changes)
        return changes

    def forget(self, uid: str) -> None:
        self._inactive.pop(uid, None)
        self._running.pop(uid, None)
