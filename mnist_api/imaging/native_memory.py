"""Make large native allocations go back to the operating system as soon as they are freed.

glibc serves a large `malloc` with its own `mmap` and unmaps it on `free`, but only above a
threshold that it raises by itself (up to 32 MiB) each time such a block is freed. After one
large image, the next ones (Pillow's 16 MiB pixel blocks, NumPy arrays) come from per-thread
heaps instead, which keep the memory after `free`: measured, a worker that decoded four
7000x7000 PNGs at once stayed 75 MB larger for good, and the decode budget's bound on live
bytes no longer bounded the worker's resident memory. Fixing the threshold at 1 MiB keeps
the budget honest; requests of ordinary size allocate nothing that large, so they are
unaffected.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD_BYTES = 1 << 20


def return_large_blocks_to_os() -> bool:
    """Serve every allocation of 1 MiB or more from its own mapping, unmapped when freed.

    Returns False where the C library has no glibc `mallopt` (musl, macOS): nothing changes.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
