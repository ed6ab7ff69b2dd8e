"""`virtfleet snapshot|migrate` build new objects; the agent's watch-echo liveness rule."""

from __future__ import annotations

import pytest
import yaml

from virtfleet import actions, manifests
from virtfleet.agent.health import Unhealthy, WatchEcho, stale_after
from virtfleet.agent.settings import AgentSettings
from virtfleet.cli import main


def test_snapshot_manifest_is_a_valid_vmsnapshot() -> None:
    manifest = actions.snapshot_manifest("web", "apps", name="s1", memory=False)
    assert manifest["kind"] == "VMSnapshot"
    assert manifest["spec"] == {"vmName": "web", "includeMemory": False}
    assert "includeMemory" not in actions.snapshot_manifest("web", "apps")["spec"]


def test_generated_names_fit() -> None:
    manifest = actions.migration_manifest("x" * 63, "apps")
    assert len(manifest["metadata"]["generateName"]) <= 58
    assert manifest["spec"] == {"vmName": "x" * 63}
    assert actions.migration_manifest("web", "a", target_node="n")["spec"]["targetNode"] == "n"


@pytest.mark.parametrize(
    ("argv", "kind"),
    [
        (["snapshot", "web", "-n", "apps", "--name", "s1", "--print"], "VMSnapshot"),
        (
            ["migrate", "web", "-n", "apps", "--to", "node-b", "--name", "m1", "--print"],
            "VMMigration",
        ),
    ],
)
def test_print_writes_a_manifest_that_validates(
    argv: list[str], kind: str, capsys: pytest.CaptureFixture[str], tmp_path: object
) -> None:
    from pathlib import Path

    assert main(argv) == 0
    text = capsys.readouterr().out
    assert yaml.safe_load(text)["kind"] == kind
    path = Path(str(tmp_path)) / "out.yaml"
    path.write_text(text)
    checked, problems = manifests.validate_paths([path])
    assert problems == []
    assert len(checked) == 1


def test_watch_echo_goes_stale() -> None:
    now = [0.0]
    echo = WatchEcho(stale_after=60, clock=lambda: now[0])
    now[0] = 30
    assert echo.check() == 30  # grace period before the first echo
    echo.seen()
    now[0] = 85
    assert echo.check() == 55
    now[0] = 200
    with pytest.raises(Unhealthy, match="stale"):
        echo.check()


def test_stale_after_scales_with_the_heartbeat() -> None:
    assert stale_after(AgentSettings(node_name="n")) == 60
    assert stale_after(AgentSettings(node_name="n", heartbeat_seconds=30)) == 180
