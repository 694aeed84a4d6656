"""Keeps freed tensor memory in the process instead of returning it to the kernel after every slice.

The streaming engine allocates and frees the same few slice-sized tensors thousands of times. With glibc's defaults
a block above the (dynamic) mmap threshold is mapped fresh and unmapped when freed, and the top of the heap is
trimmed, so every slice faults its pages in again: on a 0.5B-parameter merge that was a third of the wall time,
spent in the kernel. Fixing the mmap threshold at glibc's 32 MB maximum and raising the trim threshold keeps those
pages for the next slice. Peak memory stays the same (the same blocks are reused); memory after the peak is not
handed back until the process ends. Only processes hf-fusion owns (the CLI and the Space it serves) call this: a
library must not retune its host's allocator.
"""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_SETTINGS = ((_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 64 << 20))


def keep_freed_memory() -> bool:
    """Applies the settings above where the C library is glibc; returns whether it did."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        gnu_get_libc_version = libc.gnu_get_libc_version  # glibc only: musl's mallopt does nothing
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    gnu_get_libc_version.restype = ctypes.c_char_p
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    done = all(mallopt(option, value) == 1 for option, value in _SETTINGS)
    log.debug("glibc %s: freed memory kept for reuse: %s", gnu_get_libc_version().decode(), done)
    return done
