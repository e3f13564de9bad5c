"""Process plumbing for the benchmark: free ports, cleanup on every exit path, and memory
sampling of a whole process tree from /proc."""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

_cleanups: list[Callable[[], None]] = []
_state = {"installed": False}
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


# Below Linux's ephemeral range (32768-60999 by default): the kernel never gives these ports to
# outgoing connections. A port from bind(0) is ephemeral, and a relay's own upstream connection
# could take it between our check and the relay's bind (CI saw exactly that: EADDRINUSE).
_PORTS = (20000, 32000)


def _port_range() -> tuple[int, int]:
    """``_PORTS``, or under pytest-xdist this worker's own slice of it: two workers drawing
    the same port between the check and the bind is a collision no retry here can see."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if not (worker.startswith("gw") and worker[2:].isdigit() and count > 0):
        return _PORTS
    span = (_PORTS[1] - _PORTS[0]) // count
    start = _PORTS[0] + int(worker[2:]) % count * span
    return start, start + span


# Ports handed out by this process: a port checked free and handed out is not bound yet, so a
# second draw could give it again (a listener and its metrics port on one port: EADDRINUSE).
_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port outside the ephemeral range that was free on ``host`` a moment ago, and not
    handed out before by this process (until half of the range has been)."""
    low, high = _port_range()
    if len(_handed_out) > (high - low) // 2:
        _handed_out.clear()
    while True:
        port = random.randrange(low, high)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue  # taken: try another
        _handed_out.add(port)
        return port


def wait_port(port: int, timeout: float, host: str = "127.0.0.1",
              alive: Callable[[], bool] | None = None) -> bool:
    """Wait until ``host:port`` accepts a TCP connection (or ``alive()`` turns false)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            return False
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1.0):
            return True
        time.sleep(0.05)
    return False


def on_exit(cleanup: Callable[[], None]) -> Callable[[], None]:
    """Register ``cleanup`` to run at exit (normal, exception, SIGTERM, SIGINT, SIGHUP);
    returns a function that unregisters it."""
    _install()
    _cleanups.append(cleanup)

    def forget() -> None:
        with contextlib.suppress(ValueError):
            _cleanups.remove(cleanup)

    return forget


def run_cleanups() -> None:
    while _cleanups:
        cleanup = _cleanups.pop()
        with contextlib.suppress(Exception):
            cleanup()


def _install() -> None:
    if _state["installed"]:
        return
    _state["installed"] = True
    atexit.register(run_cleanups)

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, handler)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0,
                 sig: int = signal.SIGTERM) -> int | None:
    """Send ``sig``, wait up to ``timeout`` seconds, then SIGKILL."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(5)
    return proc.returncode


def raise_nofile(want: int = 65536) -> int:
    """Raise RLIMIT_NOFILE (soft, and hard when root) towards ``want``; returns the soft limit."""
    import resource  # noqa: PLC0415 - POSIX only

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return soft
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(want, hard), max(want, hard)))
        return want
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --------------------------------------------------------------------------- memory sampling
# pid -> parent pid of every process seen, so that each sample reads /proc/N/stat only for
# processes that are new since the last one: reading all of them (about 70 here) every 100 ms
# took 5 ms a sample, CPU that both systems under test lost to the sampler.
_PARENTS: dict[int, int] = {}
_PARENTS_LOCK = threading.Lock()


def _children_map() -> dict[int, list[int]]:
    alive = {int(name) for name in os.listdir("/proc") if name.isdigit()}
    with _PARENTS_LOCK:
        for pid in _PARENTS.keys() - alive:
            del _PARENTS[pid]  # gone; its number may come back as another process
        for pid in alive - _PARENTS.keys():
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            # pid (comm) state ppid ...; comm may contain spaces and parentheses
            _PARENTS[pid] = int(stat[stat.rindex(")") + 2:].split()[1])
        children: dict[int, list[int]] = {}
        for pid, parent in _PARENTS.items():
            children.setdefault(parent, []).append(pid)
    return children


def process_tree(roots: Iterable[int]) -> list[int]:
    """The given pids and all their descendants that exist now."""
    children = _children_map()
    result: list[int] = []
    stack = [pid for pid in roots if Path(f"/proc/{pid}").exists()]
    seen: set[int] = set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        result.append(pid)
        stack.extend(children.get(pid, ()))
    return result


def rss_kib(pid: int) -> int:
    """Resident set size in KiB (0 when the process is gone)."""
    try:
        fields = Path(f"/proc/{pid}/statm").read_text().split()
    except OSError:
        return 0
    return int(fields[1]) * PAGE_KIB


def pss_kib(pid: int) -> int:
    """Proportional set size in KiB (shared pages split between sharers); 0 when gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


@dataclass
class MemorySample:
    rss_kib: int
    pss_kib: int
    processes: int


def sample_tree(roots: Iterable[int], *, pss: bool = True) -> MemorySample:
    pids = process_tree(roots)
    return MemorySample(
        rss_kib=sum(rss_kib(pid) for pid in pids),
        pss_kib=sum(pss_kib(pid) for pid in pids) if pss else 0,
        processes=len(pids),
    )


@dataclass
class MemorySampler:
    """Samples the summed RSS/PSS of the process trees under ``roots()`` every ``interval``
    seconds in a background thread; keeps the peaks."""

    roots: Callable[[], list[int]]
    interval: float = 0.1
    # PSS (smaps_rollup walks every page table, ~1.5 ms a process) only every Nth sample; RSS
    # (statm) every time. The burst's timeline plots PSS and keeps it at every sample.
    pss_every: int = 1
    peak_rss_kib: int = 0
    peak_pss_kib: int = 0
    peak_processes: int = 0
    samples: int = 0
    record: bool = False  # keep every sample in ``timeline``
    timeline: list[tuple[float, int, int]] = field(default_factory=list)  # monotonic, RSS, PSS
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> MemorySampler:
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.sample_once()

    def sample_once(self) -> None:
        sample = sample_tree(self.roots(), pss=self.samples % self.pss_every == 0)
        self.samples += 1
        self.peak_rss_kib = max(self.peak_rss_kib, sample.rss_kib)
        self.peak_pss_kib = max(self.peak_pss_kib, sample.pss_kib)
        self.peak_processes = max(self.peak_processes, sample.processes)
        if self.record:
            self.timeline.append((time.monotonic(), sample.rss_kib, sample.pss_kib))

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                self.sample_once()
            self._stop.wait(self.interval)
