"""The chart's http-source deny-list and cloud-init Secret label reach the agent's flags."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from tests.gitops.test_chart import kubelet_expanded, one, render

from virtfleet.cli import build_parser
from virtfleet.hypervisor.download import DEFAULT_DENIED_CIDRS, denied_cidrs


def agent_args(*sets: str, extra: tuple[str, ...] = ()) -> Any:
    docs = render(*sets, extra=extra)
    pod = one(docs, "DaemonSet", "virtfleet-agent")["spec"]["template"]["spec"]
    return build_parser().parse_args(kubelet_expanded(pod["containers"][0]))


def test_by_default_loopback_and_link_local_are_denied_and_any_secret_may_be_used() -> None:
    args = agent_args()
    assert tuple(args.http_deny_cidr) == DEFAULT_DENIED_CIDRS
    assert args.http_allow_cidr is None
    assert args.cloud_init_secret_label is None


def test_deny_and_allow_lists_and_the_secret_label_are_passed_on() -> None:
    args = agent_args(
        "agent.httpSource.denyCIDRs={10.0.0.0/8,169.254.0.0/16}",
        "agent.httpSource.allowCIDRs={10.1.2.0/24}",
        "agent.cloudInit.secretLabel=virtfleet.io/cloud-init=true",
    )
    assert args.http_deny_cidr == ["10.0.0.0/8", "169.254.0.0/16"]
    assert args.http_allow_cidr == ["10.1.2.0/24"]
    assert args.cloud_init_secret_label == "virtfleet.io/cloud-init=true"


def test_an_empty_deny_list_denies_nothing(tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text("agent: {httpSource: {denyCIDRs: []}}\n")
    assert agent_args(extra=("-f", str(values))).http_deny_cidr == ["none"]


@pytest.mark.parametrize(
    "value", ["agent.httpSource.denyCIDRs={not-a-cidr}", "agent.cloudInit.secretLabel=a b"]
)
def test_the_values_schema_refuses_nonsense(value: str) -> None:
    with pytest.raises(Exception, match="values don't meet the specifications"):
        render(value)


def test_the_agent_refuses_a_cidr_that_does_not_parse() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["agent", "--node", "n", "--http-deny-cidr", "10.0.0.0/33"])


def test_the_deny_flags_become_the_agents_deny_list() -> None:
    assert denied_cidrs(None) == DEFAULT_DENIED_CIDRS
    assert denied_cidrs(["none"]) == ()
    assert denied_cidrs(["10.0.0.0/8"]) == ("10.0.0.0/8",)
