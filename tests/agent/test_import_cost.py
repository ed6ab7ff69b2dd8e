"""An agent that backs nothing up, realises no network and serves no console does not
load boto3, pyroute2, cryptography or pycdlib (~60 MiB of RSS between them: issue #21's
agent RSS target). They are imported where they are used."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("boto3", "botocore", "pyroute2", "cryptography", "pycdlib")


def test_importing_the_agent_leaves_the_heavy_libraries_out() -> None:
    code = (
        "import json, sys\n"
        "import virtfleet.agent.handlers, virtfleet.cli\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert json.loads(out.stdout) == []
