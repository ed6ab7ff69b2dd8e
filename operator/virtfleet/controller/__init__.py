"""virtfleet.controller: places VMs on nodes and watches the agents' heartbeats (DESIGN §2).

Modules: ``settings`` (tunables), ``decisions`` (pure status decisions), ``cache`` (the
in-memory view fed by watches), ``controller`` (the reconcile loop and kopf wiring),
``migrations`` and ``unclaimed`` (the VMMigration and unclaimed snapshot/restore loops).
What it reads from objects and where a VM goes are pure, in ``virtfleet.reconcile.views``
and ``virtfleet.reconcile.placement``.
"""
