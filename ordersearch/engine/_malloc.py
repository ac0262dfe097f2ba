"""glibc malloc settings under which freed activation memory is reused, not given back.

Every block forward allocates its temporaries and output around the cache's long-lived
buffers. With glibc's defaults a freed block of a few MiB goes back to the operating system
(the dynamic mmap threshold, then heap trimming), the heap grows again by one system call per
new block, and each new block is faulted in page by page, so on small blocks a forward inside
the engine ran measurably slower than the same forward in a plain model, which allocates in a
small heap it keeps reusing (``benchmarks/engine.py`` reports the per-block ratio). Here the
mmap threshold is raised to 4 MiB (a small block's chunk and temporaries come from the heap),
the heap grows in steps of 64 MiB, and free memory at its top is kept up to twice the largest
cache budget of an engine created in the process, so freed memory is reused by the next
allocation of the same size.

The threshold stays at 4 MiB, not glibc's 32 MiB maximum: larger temporaries on the heap
(whole evaluation sets in one chunk, several engines in one process) left holes that the
small allocations between them split, and the heap grew past them: with 32 MiB a full run of
``benchmarks/objectives.py`` (chunks of 2,048 images, 17.7 MB temporaries) was killed for
memory, a heap mostly free yet unusable; with 4 MiB it reports its peak per target (2.2 GB).
Mapped temporaries are faulted in at every forward: little beside a large block's arithmetic,
but noticeable on tiny blocks with large chunks, which is why that benchmark uses 192-image
chunks that stay on the heap (the engine's default chunk is 64 images on the CPU).

The settings are process-wide, so they are applied only on Linux with glibc, and not when the
user chose their own: ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``,
``MALLOC_TOP_PAD_`` or ``GLIBC_TUNABLES`` set in the environment, or
``ORDERSEARCH_TUNE_MALLOC=0``. Memory freed this way stays with the process for its next
allocations: it is not a leak, though RSS counts it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from typing import Any

__all__ = ["tune_malloc"]

log = logging.getLogger("ordersearch")

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_INT_MAX = 2**31 - 1
#: Largest block the heap serves; larger ones are mapped and unmapped on their own.
MMAP_THRESHOLD = 4 * 2**20
#: Extra memory the heap asks for each time it grows (untouched pages cost no RSS).
TOP_PAD = 64 * 2**20
#: Least free memory at the heap's top kept for reuse rather than returned to the system.
TRIM_THRESHOLD = 512 * 2**20

_mallopt: Any = None
_trim = 0


def tune_malloc(keep_bytes: int = 0) -> bool:
    """Apply the settings (once per process) and keep at least ``keep_bytes`` of free memory
    for reuse; True if they are in effect."""
    global _mallopt, _trim
    if _mallopt is None:
        _mallopt = _load()
        if _mallopt:
            ok = _mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and _mallopt(_M_TOP_PAD, TOP_PAD)
            log.debug("malloc thresholds %s", "raised" if ok else "left as they were (mallopt refused)")
            _mallopt = _mallopt if ok else False
    if not _mallopt:
        return False
    trim = min(max(TRIM_THRESHOLD, int(keep_bytes)), _INT_MAX)
    if trim > _trim and _mallopt(_M_TRIM_THRESHOLD, trim):
        _trim = trim
    return True


def _load() -> Any:
    if not sys.platform.startswith("linux") or os.environ.get("ORDERSEARCH_TUNE_MALLOC", "1") == "0":
        return False
    chosen = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")
    if any(v in os.environ for v in chosen):
        return False
    try:
        return ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
