"""Giving freed memory back to the system after a burst of large uploads.

glibc's malloc keeps the memory that freed buffers leave inside its heap: after 100 uploads of
19 MiB at once the relay stayed at about 108 MiB RSS although its live data had gone back to
what it was before (about 48 MiB idle). malloc_trim(0) returns those free pages; measured on
that burst, RSS fell to 62 MiB. It is cheap when there is nothing to give back, so the server
simply calls it every few seconds. Elsewhere (musl, macOS) there is no malloc_trim and nothing
is done.

The other half is keeping the heap between messages. By default glibc shrinks its heap as soon
as 128 KiB are free at its top and serves every buffer over 128 KiB with a fresh mmap, so each
64 KiB chunk of an upload and each 256 KiB chunk sent upstream faulted its pages in anew:
about a tenth of the relay's CPU time for large mail. With the thresholds raised the pages are
reused while mail flows, and the periodic trim still gives them back once a burst is over.
"""

from __future__ import annotations

import asyncio
import ctypes
from collections.abc import Callable

TRIM_INTERVAL = 5.0
# mallopt(3) parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
HEAP_TRIM_THRESHOLD = 64 * 1024 * 1024
HEAP_MMAP_THRESHOLD = 4 * 1024 * 1024


def keep_heap_between_messages() -> bool:
    """Raise glibc's trim and mmap thresholds (see above); False where that is not glibc."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_TRIM_THRESHOLD, HEAP_TRIM_THRESHOLD)) and \
        bool(mallopt(_M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD))


def _malloc_trim() -> Callable[[], None] | None:
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


release_free_memory = _malloc_trim()


async def keep_releasing_free_memory(release: Callable[[], None],
                                     interval: float = TRIM_INTERVAL) -> None:
    """Return free heap pages to the system every ``interval`` seconds, until cancelled."""
    while True:
        await asyncio.sleep(interval)
        release()
