"""An agent that backs nothing up, realises no network and serves no console does not
load boto3, pyroute2, cryptography or pycdlib (~60 MiB of RSS between them: issue #21's
agent RSS target). They are imported where they are used. Nor does it load the official
Kubernetes client (~18 MiB, which kopf would import only to recognise its objects)."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("boto3", "botocore", "pyroute2", "cryptography", "pycdlib", "kubernetes", "urllib3")


def test_importing_the_agent_leaves_the_heavy_libraries_out() -> None:
    code = (
        "import json, sys\n"
        "import virtfleet.cli\n"
        "parser = virtfleet.cli.build_parser()  # the command line as `virtfleet agent` has it\n"
        "from virtfleet.runtime.memory import leave_out_official_client\n"
        "assert leave_out_official_client()  # as the agent's command does, still in time\n"
        "import virtfleet.agent.handlers\n"
        f"print(json.dumps([m for m in {HEAVY!r} if sys.modules.get(m)]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert json.loads(out.stdout) == []
