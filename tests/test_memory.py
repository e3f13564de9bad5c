"""relay.memory: freed heap pages go back to the system (glibc), and the server keeps at it."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import pytest

from relay.memory import keep_releasing_free_memory, release_free_memory

# Run in a fresh interpreter: ``setup`` allocates and frees buffers, then the script prints
# RSS (KiB) with the freed memory still held, and RSS after release_free_memory().
_MEASURE = textwrap.dedent("""
    import gc, sys
    from relay.memory import keep_heap_between_messages, release_free_memory

    def rss_kib():
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))

    {setup}
    gc.collect()
    held = rss_kib()
    release_free_memory()
    print(held, rss_kib())
""")


def rss_before_and_after_release(setup: str, *args: str) -> tuple[int, int]:
    script = _MEASURE.format(setup=textwrap.dedent(setup).strip())
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True,
                            text=True, timeout=60, check=True)
    held, released = map(int, result.stdout.split())
    return held, released


# Fragment glibc's heap the way a burst of uploads does (64 KiB chunks below the mmap
# threshold, with small survivors in between), then free the chunks.
_FRAGMENT = """
    chunks, keep = [], []
    for i in range(3000):
        chunks.append(bytearray(64 * 1024 - 100))
        keep.append(bytearray(600))
    del chunks
"""


@pytest.mark.skipif(release_free_memory is None, reason="no glibc malloc_trim here")
def test_release_gives_freed_heap_pages_back() -> None:
    before, after = rss_before_and_after_release(_FRAGMENT)
    # 3000 x 64 KiB were freed; most of the ~190 MiB must leave the process.
    assert before - after > 100 * 1024, (before, after)


# Allocate and free 400 chunks of 64 KiB and 60 of 256 KiB (the sizes of DATA reads and of
# upstream writes), with nothing left on top of them: glibc's default gives the pages back at
# once, so the next message faults them in again; tuned, the heap keeps them until the trim.
_REUSE = """
    if sys.argv[1] == "tuned":
        assert keep_heap_between_messages()
    chunks = [bytearray(64 * 1024) for _ in range(400)]
    chunks += [bytearray(256 * 1024) for _ in range(60)]
    del chunks
"""


@pytest.mark.skipif(release_free_memory is None, reason="no glibc malloc_trim here")
def test_tuned_heap_keeps_freed_buffers_until_the_trim() -> None:
    results = {mode: rss_before_and_after_release(_REUSE, mode)
               for mode in ("default", "tuned")}
    default_kept, _ = results["default"]
    tuned_kept, tuned_after_trim = results["tuned"]
    # 40 MiB were allocated (under the 64 MiB trim threshold): kept by the tuned heap,
    # returned at once by default.
    assert tuned_kept - default_kept > 30 * 1024, results
    assert tuned_kept - tuned_after_trim > 30 * 1024, results


def test_the_server_loop_releases_until_cancelled() -> None:
    calls: list[None] = []

    async def run() -> None:
        task = asyncio.create_task(keep_releasing_free_memory(lambda: calls.append(None),
                                                              interval=0.01))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert len(calls) >= 3
