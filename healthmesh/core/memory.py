"""Allocator settings for a long-running agent: big buffers go back to the system when freed.

Every round the agent encodes its snapshot to JSON (megabytes at thousands of peers: the
API's answers, the json output) and drops the previous encoding. glibc serves an allocation
that large from mmap and unmaps it on free, but raises its mmap threshold to the size of
each such block freed, so from the second round on these buffers are carved from the heap,
where they fragment it and the freed space stays in the RSS. A fixed threshold (which also
turns off that adjustment) keeps them mmap'ed. Measured in docs/benchmarks.md ("Whole agent",
bench/held.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

#: mallopt() parameter numbers (glibc's malloc.h).
M_MMAP_THRESHOLD = -3
#: Blocks from this size on are mmap'ed (glibc's own starting value, kept fixed).
MMAP_THRESHOLD = 128 * 1024


_libc: ctypes.CDLL | None = None
_looked_up = False


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (looked up once), else None."""
    global _libc, _looked_up
    if not _looked_up:
        _looked_up = True
        name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
        try:
            libc = ctypes.CDLL(name) if name else None
        except OSError:
            libc = None
        if libc is not None and hasattr(libc, "gnu_get_libc_version"):
            _libc = libc
    return _libc


def release_free_memory() -> bool:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim(0)``).

    Called after each round's rendering, in a worker thread: ctypes releases the GIL for
    the call, which takes about a millisecond at 5,000 peers. True when done (glibc only).
    """
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def tune_allocator() -> bool:
    """Fix glibc's mmap threshold; True when done (False off glibc, e.g. musl or macOS).

    An explicit ``MALLOC_MMAP_THRESHOLD_`` in the environment is the operator's choice and
    is left alone.
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    libc = _glibc()
    if libc is None:  # not glibc (musl's mallopt does nothing)
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
