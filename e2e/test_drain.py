"""Node drain on the real system: ``kubectl cordon`` turns into live migrations.

A VM with ``evictionStrategy: LiveMigrate`` leaves the cordoned node without a restart
(its ``VF-UPTIME`` keeps counting on the other node); one with ``evictionStrategy: None``
stays and gets a Warning Event. Every cordon is undone in a ``finally``.
"""

from __future__ import annotations

import json
from functools import partial
from typing import Any

from harness import nodes as hn
from harness.guest import BOOT_MARKER
from harness.testing import Cluster, domain_name, vm_manifest, wait_for
from test_migration import DATA_DISK, has_domain, uptimes, wait_phase

EVICTION_LABEL = "virtfleet.io/eviction"


def running_on(system: Cluster, ns: str, name: str, node: str) -> dict[str, Any] | None:
    vm = system.get("vm", name, ns)
    st = vm.get("status") or {}
    return vm if st.get("printableStatus") == "Running" and st.get("nodeName") == node else None


def test_cordon_migrates_live_migrate_vms_and_reports_the_others(
    system: Cluster, namespace: str
) -> None:
    a, b = system.node("node-a"), system.node("node-b")
    try:
        # Both VMs on node-a: node-b is cordoned while they are placed.
        system.kubectl("cordon", b.name)
        system.apply(
            vm_manifest("mobile", namespace, evictionStrategy="LiveMigrate", disks=DATA_DISK)
        )
        system.apply(vm_manifest("anchored", namespace, evictionStrategy="None"))
        for name in ("mobile", "anchored"):
            wait_for(partial(running_on, system, namespace, name, a.name), 120, 0.3, n_run(name))
        system.kubectl("uncordon", b.name)
        dom = domain_name(namespace, "mobile")
        hn.wait_for_serial(a, dom, BOOT_MARKER, timeout=60)
        wait_for(lambda: max(uptimes(a, dom), default=0) >= 3, 60, what="uptime 3 s")

        system.kubectl("cordon", a.name)
        mig_name = f"mobile-evict-{a.name}"
        wait_for(
            lambda: (
                system.kubectl("get", "vmmig", mig_name, "-n", namespace, check=False).returncode
                == 0
            ),
            60,
            0.3,
            "the eviction VMMigration",
        )
        mig = wait_phase(system, namespace, mig_name, ("Succeeded", "Failed"), timeout=180)
        assert mig["status"]["phase"] == "Succeeded", mig["status"]
        assert mig["metadata"]["labels"][EVICTION_LABEL] == a.name
        assert mig["status"]["targetNode"] == b.name

        wait_for(lambda: running_on(system, namespace, "mobile", b.name), 60, 0.3, "mobile on b")
        last_on_source = max(uptimes(a, dom))
        wait_for(
            lambda: max(uptimes(b, dom), default=0) >= last_on_source + 2,
            60,
            what="uptime counting on node-b",
        )
        resumed = [u for u in uptimes(b, dom) if u > 0]
        assert resumed[0] >= last_on_source - 2, (last_on_source, resumed[:3])
        assert not has_domain(a, dom)

        # The VM with evictionStrategy None stays, and is reported.
        def reported() -> list[dict[str, Any]]:
            out = system.kubectl(
                "get",
                "events",
                "-n",
                namespace,
                "--field-selector",
                "involvedObject.name=anchored,reason=EvictionBlocked",
                "-o",
                "json",
            ).stdout
            return list(json.loads(out)["items"])

        events = wait_for(reported, 60, 0.5, "EvictionBlocked event on anchored")
        assert events[0]["type"] == "Warning"
        assert running_on(system, namespace, "anchored", a.name)
        assert has_domain(a, domain_name(namespace, "anchored"))
        migs = json.loads(system.kubectl("get", "vmmig", "-n", namespace, "-o", "json").stdout)[
            "items"
        ]
        assert [m["metadata"]["name"] for m in migs] == [mig_name]
        print(f"\n[drain] {mig_name}: {mig['status']['phase']}; anchored stays on {a.name}")
    finally:
        system.kubectl("uncordon", a.name, check=False)
        system.kubectl("uncordon", b.name, check=False)


def n_run(name: str) -> str:
    return f"vm {name} Running on node-a"
