"""The malloc arena cap: glibc here, a harmless no-op elsewhere."""

from __future__ import annotations

import subprocess
import sys

from virtfleet.runtime.memory import limit_malloc_arenas


def test_glibc_accepts_the_cap() -> None:
    assert limit_malloc_arenas(2) is True


def test_threads_after_the_cap_share_two_arenas() -> None:
    # malloc_stats() prints one "Arena N:" block per arena to stderr; run in a fresh
    # process so this test's own threads do not count.
    code = (
        "import ctypes, threading\n"
        "from virtfleet.runtime.memory import limit_malloc_arenas\n"
        "limit_malloc_arenas(2)\n"
        "def work():\n"
        "    blobs = [bytearray(4096) for _ in range(2000)]\n"
        "    del blobs\n"
        "ts = [threading.Thread(target=work) for _ in range(8)]\n"
        "[t.start() for t in ts]; [t.join() for t in ts]\n"
        "ctypes.CDLL(None).malloc_stats()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    arenas = [line for line in out.stderr.splitlines() if line.startswith("Arena ")]
    assert 1 <= len(arenas) <= 2, out.stderr
