"""A node's own half of fencing: when its agent must stop its HA VMs, when it may start
them, and when it pets the watchdog. Pure; the agent's ``agent.fencing`` acts on it.

The contract with the controller (docs/failover.md): the agent renews its Lease every
``renew`` seconds with a compare-and-swap. The controller fails a node's VMs over only
after it wrote a fence mark into that Lease (also a compare-and-swap), which it does
no earlier than ``self_fence_after + watchdog_timeout + margin`` after it last *saw* a
renewal. A renewal the agent sent at ``t`` reached the apiserver after ``t``, and the
controller saw it later still, so measured on the agent's own clock:

* by ``last_sent + self_fence_after`` the agent has destroyed its HA VMs' domains
  (self-fencing), and starts none after that;
* if it cannot (libvirtd hangs, the agent's loop is stuck, the agent is dead), it stops
  petting the watchdog, which resets the node ``watchdog_timeout`` later.

Either way no HA VM of the node runs when the controller fences it. After a fence mark
the agent starts no HA VM until it has read every VM afresh (the controller may have
moved them) and cleared the mark: ``recovering``.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Keep this much of the lease's validity in hand before starting an HA VM: a start
#: takes about a second, and the guest must not come up after the self-fence deadline.
START_MARGIN_SECONDS = 2.0

#: Lease annotations (the Lease is the protocol's record; see docs/failover.md).
FENCED_ANNOTATION = "virtfleet.io/fenced"
SELF_FENCE_ANNOTATION = "virtfleet.io/self-fence-after-seconds"
WATCHDOG_ANNOTATION = "virtfleet.io/watchdog-timeout-seconds"


@dataclass(frozen=True)
class LeaseState:
    """What the agent knows of its own Lease (monotonic seconds)."""

    #: When the last *successful* renewal was sent (None: none yet in this process).
    last_sent: float | None
    #: The Lease carries a fence mark: the controller may have moved the node's HA VMs.
    fenced: bool
    #: After a fence mark: the VMs have not been read afresh and the mark not cleared.
    recovering: bool


def lease_valid(state: LeaseState, now: float, self_fence_after: float) -> bool:
    """The node still holds its claim on its HA VMs at ``now``."""
    return state.last_sent is not None and now < state.last_sent + self_fence_after


def start_hold(state: LeaseState, now: float, self_fence_after: float | None) -> str | None:
    """Why an HA VM may not start here now (None: it may)."""
    if state.fenced or state.recovering:
        return (
            "this node was fenced (its Lease carries a fence mark): HA VMs wait until the "
            "agent has checked where each of them lives now"
        )
    if self_fence_after is None:
        return None
    if state.last_sent is None:
        return "the node's Lease has not been renewed yet: HA VMs wait for it"
    if not lease_valid(state, now + START_MARGIN_SECONDS, self_fence_after):
        return (
            "the node's Lease could not be renewed: HA VMs are not started while the "
            "controller may be failing them over"
        )
    return None


def must_self_fence(state: LeaseState, now: float, self_fence_after: float | None) -> bool:
    """The HA VMs' domains here must be destroyed now."""
    if state.fenced:
        return True  # the controller has fenced us: whatever runs here is a stale copy
    if self_fence_after is None:
        return False
    # No renewal known (the Lease could not be read): the promise of the previous process
    # may have run out, so HA domains left running by it must not run on.
    return not lease_valid(state, now, self_fence_after)


def pet_watchdog(
    state: LeaseState, now: float, self_fence_after: float | None, ha_active: int | None
) -> bool:
    """Pet the watchdog now? Yes while the lease holds, or once no HA domain is active
    here. ``ha_active`` None: unknown (libvirtd does not answer) — no pet: the node resets.
    """
    if self_fence_after is None or not must_self_fence(state, now, self_fence_after):
        return True
    return ha_active == 0
