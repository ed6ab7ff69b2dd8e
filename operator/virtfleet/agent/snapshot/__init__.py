"""The node agent's VMSnapshot and VMRestore loops: read → decide → act, per VM.

Same shape as the VM loop (:mod:`virtfleet.agent.agent`): kopf handlers only keep the
caches and enqueue keys; a worker observes the VM's domain, asks the pure functions of
:mod:`virtfleet.reconcile.snapshot` and :mod:`virtfleet.reconcile.restore` what to do,
does it through the hypervisor adapter and looks again until nothing is left.

Which agent acts: the one whose node holds the VM (the VM is in its cache, labelled and
placed for it). Snapshots are queued per snapshot; restores per *VM*, so all restores of
one VM are judged together and one at a time.

Coordination with the VM loop: every reconcile that touches a VM's domain (the VM loop,
a snapshot, a restore) holds that VM's :class:`~virtfleet.agent.locks.VmLocks` lock, so
the VM loop never "heals" a domain a revert is in the middle of, and a snapshot is never
taken while the domain is being redefined, started or stopped.

Modules: :mod:`.agent` (the shared state, queues and kopf wiring), :mod:`.snapshots` and
:mod:`.restores` (the two loops), :mod:`.views` (objects as decision inputs),
:mod:`.domain` (the libvirt side), :mod:`.redefine` (snapshot XML from status, checked)
and :mod:`.store` (API writes).
"""
