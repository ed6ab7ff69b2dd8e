"""virtfleet.controller: places VMs on nodes and watches the agents' heartbeats (DESIGN §2).

Modules: ``settings`` (tunables), ``views`` (what the controller reads from objects),
``placement`` (pure placement), ``decisions`` (pure status decisions), ``cache`` (the
in-memory view fed by watches), ``controller`` (the reconcile loop and kopf wiring).
"""
