"""Several relay processes sharing the SMTP ports, for when one core is not enough.

Like Postfix's master: the supervisor forks ``workers`` children before any event loop exists,
each a complete relay (listener, own spool, delivery) bound with SO_REUSEPORT so the kernel
spreads connections. It forwards SIGTERM/SIGINT/SIGHUP, restarts a child that dies, owns the
pid file and talks to systemd.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable

from relay import sdnotify
from relay.app import Server, StartupError
from relay.config import Config
from relay.pidfile import remove_pid, write_pid

log = logging.getLogger("relay.supervisor")

_RESTART_DELAY = 1.0
_READY_TIMEOUT = 60.0

Runner = Callable[[Server], None]


def run_workers(config: Config, config_path: str | None, run: Runner) -> int:
    """Fork the workers, supervise them until a stop signal; returns the exit code."""
    count = config.workers
    supervisor = _Supervisor(config, config_path, run)
    supervisor.install_signal_handlers()  # before the first fork: a TERM may come at any time
    for index in range(count):
        if supervisor.stopping:
            break
        if not supervisor.spawn(index, wait_ready=True):
            supervisor.stop_all()
            return 1
    write_pid(config.queue.path)
    log.info("supervising %d worker processes", count)
    sdnotify.ready(f"relaying with {count} workers")
    try:
        return supervisor.supervise()
    finally:
        remove_pid(config.queue.path)


class _Supervisor:
    def __init__(self, config: Config, config_path: str | None, run: Runner) -> None:
        self.config = config
        self.config_path = config_path
        self.run = run
        self.children: dict[int, int] = {}  # pid -> worker index
        self.stopping = False

    def spawn(self, index: int, *, wait_ready: bool) -> bool:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker
            os.close(read_end)
            self._become_worker(index, write_end)
        os.close(write_end)
        self.children[pid] = index
        if not wait_ready:
            os.close(read_end)
            return True
        ready = _wait_ready(read_end)
        os.close(read_end)
        if not ready:
            log.error("worker %d did not start", index)
        return ready

    def _become_worker(self, index: int, ready_fd: int) -> None:
        code = 1
        try:
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(signum, signal.SIG_DFL)
            server = Server(self.config, self.config_path, worker=index,
                            workers=self.config.workers)
            server.on_ready = lambda: _signal_ready(ready_fd)
            self.run(server)
            code = 0
        except StartupError as exc:
            log.error("worker %d: %s", index, exc)
        except BaseException:
            log.exception("worker %d crashed", index)
        finally:
            logging.shutdown()  # os._exit skips it: the loop's last gathered lines
            os._exit(code)

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_reload)

    def supervise(self) -> int:
        failed = False
        while self.children:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            except InterruptedError:
                continue
            index = self.children.pop(pid, None)
            if index is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            if self.stopping:
                failed |= code != 0
                continue
            log.error("worker %d exited with %s; restarting it", index, code)
            time.sleep(_RESTART_DELAY)
            if not self.stopping:
                self.spawn(index, wait_ready=False)
        return 1 if failed else 0

    def _on_stop(self, signum: int, _frame: object) -> None:
        if not self.stopping:
            self.stopping = True
            sdnotify.stopping()
            log.info("stopping %d workers", len(self.children))
        self._forward(signal.SIGTERM)

    def _on_reload(self, signum: int, _frame: object) -> None:
        log.info("reload requested: passing it to the workers")
        self._forward(signal.SIGHUP)

    def _forward(self, signum: int) -> None:
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def stop_all(self) -> None:
        self.stopping = True
        self._forward(signal.SIGTERM)
        while self.children:
            try:
                pid, _ = os.wait()
            except ChildProcessError:
                break
            self.children.pop(pid, None)


def _signal_ready(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, b"R")
        os.close(fd)


def _wait_ready(fd: int) -> bool:
    deadline = time.monotonic() + _READY_TIMEOUT
    os.set_blocking(fd, True)
    import select  # noqa: PLC0415

    while time.monotonic() < deadline:
        readable, _, _ = select.select([fd], [], [], 0.5)
        if readable:
            return os.read(fd, 1) == b"R"
    return False

