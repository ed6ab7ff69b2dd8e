"""The source node's part of a VMMigration, split the way KubeVirt's virt-handler splits
migration source work: the loop (:mod:`.loop`), the refusal checks (:mod:`.checks`),
the live job (:mod:`.live`), the offline job (:mod:`.offline`), the target's set-up
(:mod:`.target`), the hand-over (:mod:`.handoff`) and the recovery after a restart
(:mod:`.recovery`). Every decision is a pure function in
:mod:`virtfleet.reconcile.migration_job`; these modules observe and act.
"""

from __future__ import annotations

from virtfleet.agent.migration.loop import MigrationAgent
from virtfleet.agent.migration.wiring import register, start

__all__ = ["MigrationAgent", "register", "start"]
