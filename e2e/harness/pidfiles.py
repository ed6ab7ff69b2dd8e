"""Background processes the harness starts and must stop again, tracked by pid files.

A pid file holds the pid and a *marker*, a string of the command line: a pid recycled
after a crash or reboot never matches it, so nothing unrelated is ever signalled. Each
process gets its own session, so stopping it stops its children too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path


def running(pidfile: Path) -> int | None:
    """The pid in ``pidfile`` if that process lives and is still ours: its command line
    holds the recorded marker, and it is not a zombie."""
    try:
        pid_line, _, marker = pidfile.read_text().strip().partition("\n")
        pid = int(pid_line)
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (OSError, ValueError, IndexError):
        return None
    if state == "Z":
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        return None
    return pid if marker and marker in cmdline else None


def spawn(
    pidfile: Path, log: Path, argv: Sequence[str], marker: str, env: dict[str, str] | None = None
) -> None:
    """Start ``argv`` in its own session, appending to ``log``; ``marker`` must be part of
    its command line (see :func:`running`)."""
    assert marker in " ".join(argv), (marker, argv)
    log.parent.mkdir(parents=True, exist_ok=True)
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, env=env,
        )  # fmt: skip
    pidfile.write_text(f"{proc.pid}\n{marker}\n")
    # Until the child has exec'd, its command line is empty (or the parent's), and
    # running() would call it gone: return once the marker shows, or the child ended.
    deadline = time.monotonic() + 10
    while proc.poll() is None and running(pidfile) is None and time.monotonic() < deadline:
        time.sleep(0.005)


def stop(pidfile: Path, timeout: float = 20.0) -> None:
    """SIGTERM the process's session, SIGKILL what is left after ``timeout``; idempotent."""
    pid = running(pidfile)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while running(pidfile) is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    pidfile.unlink(missing_ok=True)


class NotReadyError(RuntimeError):
    """A process died or did not answer in time; the message has its log's tail."""


def wait_answering(pidfile: Path, url: str, log: Path, timeout: float = 60.0) -> None:
    """Poll ``url`` until it answers 200; fail at once, with ``log``'s tail, if the
    process of ``pidfile`` ends first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
            last = f"HTTP {response.status}"
        except OSError as err:
            last = str(err)
        if running(pidfile) is None or time.monotonic() > deadline:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
            gone = "ended" if running(pidfile) is None else f"did not answer ({last})"
            raise NotReadyError(f"{pidfile.stem} {gone}; {log} ends with:\n{tail}")
        time.sleep(0.2)
