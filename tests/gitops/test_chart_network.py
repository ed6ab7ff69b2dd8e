"""The chart's ``agent.network`` values: what they render, and that the agent takes it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.gitops.test_chart import CHART, kubelet_expanded, one, render

from harness import helm as hh
from virtfleet.agent.network import NetworkPolicy, policy_from_args
from virtfleet.cli import build_parser


def agent_pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    pod: dict[str, Any] = one(docs, "DaemonSet", "virtfleet-agent")["spec"]["template"]["spec"]
    return pod


def policy_of(pod: dict[str, Any]) -> NetworkPolicy:
    (container,) = pod["containers"]
    return policy_from_args(build_parser().parse_args(kubelet_expanded(container)))


def test_defaults_fence_user_nics_and_allow_no_bridge() -> None:
    pod = agent_pod(render())
    assert policy_of(pod) == NetworkPolicy()
    # The table lives in the host's network namespace.
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"


def test_allow_lists_and_settings_reach_the_agent(tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(
        yaml.safe_dump(
            {
                "agent": {
                    "privileged": False,
                    "network": {
                        "allowedBridges": {"*": ["br0"], "team-a": ["br-a", "br-b"]},
                        "nwfilter": "none",
                        "qemuGid": 107,
                        "userNicDenyCIDRs": [],
                        "userNicAllowLocalPorts": ["53"],
                    },
                }
            }
        )
    )
    pod = agent_pod(render(extra=("-f", str(values))))
    policy = policy_of(pod)
    assert policy.allowed_bridges == {"*": {"br0"}, "team-a": {"br-a", "br-b"}}
    assert policy.nwfilter is None
    assert policy.qemu_gid == 107
    assert policy.user_nic_deny == ()
    assert policy.user_nic_local_ports == ("53",)
    (container,) = pod["containers"]
    # VMNetworks (on by default): bridges and VXLAN, and the DHCP servers' namespaces.
    assert container["securityContext"]["capabilities"] == {
        "drop": ["ALL"],
        "add": ["NET_ADMIN", "SYS_ADMIN"],
    }
    assert "--tunnel-address=$(HOST_IP)" in container["args"]
    assert {"name": "HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}} in (
        container["env"]
    )


def test_the_admins_opt_in_needs_no_host_network() -> None:
    sets = ("agent.network.userNicHostAccess=true", "agent.privileged=false")
    pod = agent_pod(render(*sets, "agent.network.vmNetworks=false"))
    assert policy_of(pod).user_host_access
    assert "hostNetwork" not in pod
    (container,) = pod["containers"]
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert not [a for a in container["args"] if a.startswith("--qemu-gid")]
    assert not [a for a in container["args"] if a.startswith("--tunnel-address")]
    # VMNetworks (the default) are the node's bridges: the host's namespace again.
    assert agent_pod(render(*sets))["hostNetwork"] is True


@pytest.mark.parametrize(
    ("sets", "complaint"),
    [
        ("agent.network.qemuGid=0", "agent.network.qemuGid"),
        ("agent.network.nwfilter=a b", "agent.network.nwfilter"),
        ("agent.network.userNicAllowLocalPorts={any}", "agent.network.userNicAllowLocalPorts"),
        ("agent.network.bogus=1", "Additional property bogus is not allowed"),
    ],
)
def test_schema_refuses_bad_network_values(sets: str, complaint: str) -> None:
    result = hh.helm("template", "virtfleet", str(CHART), "--set", sets, check=False)
    assert result.returncode != 0
    assert complaint in result.stderr
