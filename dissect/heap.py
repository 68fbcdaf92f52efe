"""glibc heap settings that keep a CPU forward pass's freed activation memory for the next batch.

A model's forward pass on the CPU allocates and frees the same tens of MB of
layer outputs every batch. When the pass runs in a thread other than the main
one (a dask worker thread), glibc serves it from a per-thread arena made of
64 MiB heaps, and by default hands a heap back to the system as soon as it is
all free, and its top as soon as it passes the (dynamic) trim threshold; the
next batch then faults every page in again. Measured on the embedded model
(this project's 2-core VM, 2026-12-04, 1,024 images, batch 32, six
alternating runs each): inside the extract stream 106,000-153,000 minor page
faults in the forward thread alone, a forward pass of 1.75-2.02 s and a
stream of 2.44-2.73 s; with ``retained_heap`` 38,000-52,000 faults,
1.48-1.75 s and 2.25-2.44 s. A bare loop outside the stage flips between
the two states from run to run (4,700 or 195,000 faults), a likely cause of
the 1.5x swings of bare forward loops here.

Two settings together do it (each alone made it worse: setting either turns
off glibc's dynamic thresholds): an mmap threshold at glibc's largest
dynamic value (``MMAP_THRESHOLD``), so that every output up to 32 MiB comes
from a heap, and a top pad of a whole heap (``TOP_PAD``), so that no heap is
shrunk or handed back while the stream runs (a 16 or 32 MiB pad still left
128,000 and 47,000 faults). While inside, every thread arena keeps its peak.
On leaving, the pad goes back to glibc's default and the trim threshold to
the value glibc's dynamic rule gives that mmap threshold (twice it);
``malloc_trim`` returns the main arena's free memory at once, and a thread's
arena gives back its spare heaps at its next free (glibc trims a thread's
heaps only there), keeping at most one 64 MiB heap, as glibc does by itself.
The mmap threshold stays: glibc's dynamic rule raises it to the same value at
the first freed block of 32 MiB, which every stage of a real run frees.

Elsewhere than glibc (macOS, musl) this does nothing.
"""

import ctypes
import ctypes.util
import functools
import logging
import platform
import threading
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

#: mallopt parameter numbers (glibc's malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
#: glibc's largest dynamic mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
MMAP_THRESHOLD = 32 * 2**20
#: a thread arena's heap size on 64-bit (HEAP_MAX_SIZE): a pad this large keeps every heap while the stream runs
TOP_PAD = 64 * 2**20
#: glibc's default top pad (DEFAULT_TOP_PAD)
GLIBC_TOP_PAD = 128 * 1024

_LOCK = threading.Lock()
_HOLDERS = [0]


@functools.cache
def glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (which has ``mallopt`` and ``malloc_trim``), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def _set(libc: ctypes.CDLL, parameter: int, value: int) -> None:
    if libc.mallopt(parameter, value) != 1:
        log.warning("heap: glibc refused mallopt(%d, %d)", parameter, value)


@contextmanager
def retained_heap() -> Iterator[bool]:
    """Keep freed memory in glibc's heaps while inside; yields whether the settings apply (glibc only).

    Nested or concurrent holders share the settings; the last one out restores
    them and trims the heaps (see the module docstring).
    """
    libc = glibc()
    if libc is None:
        yield False
        return
    with _LOCK:
        if not _HOLDERS[0]:
            _set(libc, M_MMAP_THRESHOLD, MMAP_THRESHOLD)
            _set(libc, M_TOP_PAD, TOP_PAD)
        _HOLDERS[0] += 1
    try:
        yield True
    finally:
        with _LOCK:
            _HOLDERS[0] -= 1
            if not _HOLDERS[0]:
                _set(libc, M_TOP_PAD, GLIBC_TOP_PAD)
                _set(libc, M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD)
                libc.malloc_trim(0)
