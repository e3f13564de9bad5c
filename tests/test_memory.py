"""relay.memory: freed heap pages go back to the system (glibc), and the server keeps at it."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import pytest

from relay.memory import keep_releasing_free_memory, release_free_memory

# Fragment glibc's heap the way a burst of uploads does (64 KiB chunks below the mmap
# threshold, with small survivors in between), free the chunks, and report RSS before and
# after the release.
_FRAGMENT = textwrap.dedent("""
    import gc
    from relay.memory import release_free_memory

    def rss_kib():
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))

    chunks, keep = [], []
    for i in range(3000):
        chunks.append(bytearray(64 * 1024 - 100))
        keep.append(bytearray(600))
    del chunks
    gc.collect()
    before = rss_kib()
    release_free_memory()
    print(before, rss_kib())
""")


@pytest.mark.skipif(release_free_memory is None, reason="no glibc malloc_trim here")
def test_release_gives_freed_heap_pages_back() -> None:
    result = subprocess.run([sys.executable, "-c", _FRAGMENT], capture_output=True, text=True,
                            timeout=60, check=True)
    before, after = map(int, result.stdout.split())
    # 3000 x 64 KiB were freed; most of the ~190 MiB must leave the process.
    assert before - after > 100 * 1024, (before, after)


# Allocate and free 400 chunks of 64 KiB and 60 of 256 KiB (the sizes of DATA reads and of
# upstream writes), with nothing left on top of them: glibc's default gives the pages back at
# once, so the next message faults them in again; tuned, the heap keeps them until the trim.
_REUSE = textwrap.dedent("""
    import gc, sys
    from relay.memory import keep_heap_between_messages, release_free_memory

    def rss_kib():
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))

    if sys.argv[1] == "tuned":
        assert keep_heap_between_messages()
    chunks = [bytearray(64 * 1024) for _ in range(400)]
    chunks += [bytearray(256 * 1024) for _ in range(60)]
    del chunks
    gc.collect()
    kept = rss_kib()
    release_free_memory()
    print(kept, rss_kib())
""")


@pytest.mark.skipif(release_free_memory is None, reason="no glibc malloc_trim here")
def test_tuned_heap_keeps_freed_buffers_until_the_trim() -> None:
    results = {}
    for mode in ("default", "tuned"):
        run = subprocess.run([sys.executable, "-c", _REUSE, mode], capture_output=True,
                             text=True, timeout=60, check=True)
        results[mode] = tuple(map(int, run.stdout.split()))
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
