"""Process-wide CPU runtime settings.

:func:`keep_freed_memory` stops glibc's ``malloc`` from handing large blocks back to the
operating system. By default every allocation above the mmap threshold (128 KiB, adapting up
to 32 MiB) is a fresh ``mmap`` whose pages fault in on first touch, and freed heap tops are
trimmed; a 32×32 UNet forward on 256 images allocates activations of ~33 MiB per layer, so
each one paid for page faults. Keeping freed memory for reuse makes ShapesWorld rollouts
about 1.5–2× faster on CPU (benchmarks/rollout.py); the cost is that the process's resident
memory stays at its peak instead of shrinking between phases.

The ``diffalign`` command calls it at start; library users call it once themselves.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

#: glibc ``mallopt`` parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: Blocks below this size come from the reusable heap; freed memory up to it is kept.
DEFAULT_THRESHOLD = 1 << 30

_applied: int | None = None


def keep_freed_memory(threshold_bytes: int = DEFAULT_THRESHOLD) -> bool:
    """Raise glibc's mmap and trim thresholds to ``threshold_bytes`` (process-wide).

    Returns True when applied (Linux with glibc), False where it does not apply (macOS,
    Windows, musl); it never raises for a platform that lacks it. Idempotent.
    """
    global _applied
    if not 0 < threshold_bytes < 2**31:
        raise ValueError(f"threshold_bytes must be in (0, 2**31) (a C int); got {threshold_bytes}")
    if _applied == threshold_bytes:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, threshold_bytes) == 1 and mallopt(_M_TRIM_THRESHOLD, threshold_bytes) == 1
    if ok:
        _applied = threshold_bytes
    return ok
