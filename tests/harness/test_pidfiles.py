"""Background processes by pid file: a just-started one is running at once.

Before it fixed that, a controller asked for right after ``spawn`` could still show the
parent's (or an empty) command line, and ``running`` called it gone: CI's first run of
the Flux test failed "source-controller ended" while it was starting.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from harness import pidfiles


def test_a_spawned_process_is_running_at_once_and_gone_after_stop(tmp_path: Path) -> None:
    sleep = shutil.which("sleep")
    assert sleep is not None
    pidfile = tmp_path / "sleep.pid"
    for _ in range(20):
        pidfiles.spawn(pidfile, tmp_path / "sleep.log", [sleep, "30"], marker=sleep)
        assert pidfiles.running(pidfile) is not None
        pidfiles.stop(pidfile, timeout=5)
        assert pidfiles.running(pidfile) is None
        assert not pidfile.exists()
