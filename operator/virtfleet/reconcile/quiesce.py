"""Whether a snapshot was quiesced, recorded where it cannot be lost: pure.

The agent freezes the guest's filesystems (when asked and an agent is connected), takes the
libvirt snapshot, and thaws. What the freeze came to is written into the snapshot's own
``<description>`` at creation, so the decision that later marks the VMSnapshot Ready reads
it from libvirt: an agent killed between the snapshot and its status write still reports
the truth, and a re-created (redefined) snapshot keeps it.
"""

from __future__ import annotations

import json
from enum import StrEnum

from virtfleet.api.snapshot import SnapshotIndication

__all__ = [
    "QuiesceOutcome",
    "describe",
    "indications",
    "read_outcome",
]

#: Characters of the agent's error kept in the description (and so in the Event).
MAX_ERROR = 300


class QuiesceOutcome(StrEnum):
    #: Filesystems were frozen while the disks were captured.
    QUIESCED = "Quiesced"
    NO_GUEST_AGENT = "NoGuestAgent"
    QUIESCE_FAILED = "QuiesceFailed"

    @property
    def froze(self) -> bool:
        """A freeze was attempted: the guest may be (partly) frozen until thawed."""
        return self is not QuiesceOutcome.NO_GUEST_AGENT


def describe(
    namespace: str,
    name: str,
    uid: str,
    outcome: QuiesceOutcome | None,
    error: str | None = None,
) -> str:
    """The libvirt snapshot's description: whose it is, and the freeze's outcome."""
    body: dict[str, str] = {"vmsnapshot": f"{namespace}/{name}", "uid": uid}
    if outcome is not None:
        body["quiesce"] = outcome.value
    if error:
        body["quiesceError"] = error[:MAX_ERROR]
    return json.dumps(body)


def read_outcome(description: str | None) -> tuple[QuiesceOutcome | None, str | None]:
    """(outcome, error) from a description :func:`describe` wrote; ``(None, None)`` for
    snapshots taken without quiesce, by older versions, or by someone else."""
    if not description:
        return None, None
    try:
        body = json.loads(description)
    except ValueError:
        return None, None
    if not isinstance(body, dict):
        return None, None
    try:
        outcome = QuiesceOutcome(str(body.get("quiesce")))
    except ValueError:
        return None, None
    error = body.get("quiesceError")
    return outcome, str(error) if error else None


def indications(*, online: bool, outcome: QuiesceOutcome | None) -> list[SnapshotIndication]:
    """KubeVirt's indications of a snapshot, from what the agent saw when it took it."""
    out: list[SnapshotIndication] = []
    if online:
        out.append(SnapshotIndication.ONLINE)
    if outcome in (QuiesceOutcome.QUIESCED, QuiesceOutcome.QUIESCE_FAILED):
        out.append(SnapshotIndication.GUEST_AGENT)
    if outcome is QuiesceOutcome.NO_GUEST_AGENT:
        out.append(SnapshotIndication.NO_GUEST_AGENT)
    if outcome is QuiesceOutcome.QUIESCE_FAILED:
        out.append(SnapshotIndication.QUIESCE_FAILED)
    return out
