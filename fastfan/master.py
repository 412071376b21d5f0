"""The process `fastfan run` starts: it forks the workers and keeps them alive.

It does no WebSocket work. Its loop waits for signals (SIGCHLD, SIGTERM, SIGINT) with
`sigtimedwait`, so it needs no threads, no event loop, and nothing to clean up in a child
after `os.fork`.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import resource
import secrets
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass

from ._picows.version import __version__ as picows_version
from .config import Config
from .logs import configure
from .metrics import SharedFigures
from .worker import Placement, run_worker

log = logging.getLogger("fastfan.master")

SIGNALS = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT}
# A worker that lived this long before dying is replaced at once; one that dies sooner
# keeps dying, and waits 0.1 s, 0.2 s, 0.4 s, ... up to RESTART_DELAY_MAX between tries.
HEALTHY_LIFETIME = 10.0
RESTART_DELAY_MAX = 10.0
# Beyond the shutdown grace, how long workers get to exit before they are killed.
EXIT_MARGIN = 5.0
PR_SET_PDEATHSIG = 1


def raise_open_files_limit() -> int:
    """Each connection is a file descriptor: take every one the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


@dataclass
class Slot:
    pid: int = 0
    started: float = 0.0
    quick_deaths: int = 0
    restart_at: float | None = None
    # The worker's clientIds begin with this; its replacement is told the one before, to
    # clear what its clients left behind elsewhere (presence in Redis).
    client_id_prefix: str = ""


class Master:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.pid = os.getpid()
        self.figures = SharedFigures(config.workers)
        self.slots = [Slot() for _ in range(config.workers)]
        # The embedded bus's sockets, reachable by our uid only (see bus/mesh.py).
        self.bus_directory = ""

    def run(self) -> int:
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        if self.config.workers > 1 and self.config.redis is None:
            self.bus_directory = tempfile.mkdtemp(prefix="fastfan-bus-")
        try:
            for index in range(len(self.slots)):
                self._spawn(index)
            while True:
                received = signal.sigtimedwait(SIGNALS, self._wait_time())
                self._reap()
                if received is not None and received.si_signo != signal.SIGCHLD:
                    return self._shut_down(received.si_signo)
                self._restart_due()
        finally:
            if self.bus_directory:
                shutil.rmtree(self.bus_directory, ignore_errors=True)

    def _spawn(self, index: int) -> None:
        slot = self.slots[index]
        previous, slot.client_id_prefix = slot.client_id_prefix, secrets.token_hex(6)
        # Frozen, the master's objects are never walked by a worker's collections, whose
        # writes to their headers would copy the pages the workers share with the master.
        gc.freeze()
        pid = os.fork()
        if pid == 0:
            os._exit(self._child(index, previous))
        self.slots[index].pid = pid
        self.slots[index].started = time.monotonic()
        self.slots[index].restart_at = None

    def _child(self, index: int, previous_prefix: str) -> int:
        """The worker's life, in the forked child; returns its exit status."""
        try:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
            # If the master dies, even by SIGKILL, the kernel sends us SIGTERM.
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != self.pid:
                return 0  # the master died before prctl took effect
            run_worker(self.config, Placement(
                index, self.pid, self.figures, self.bus_directory,
                client_id_prefix=self.slots[index].client_id_prefix,
                previous_client_id_prefix=previous_prefix))
            return 0
        except BaseException:
            log.exception("worker %d failed", index)
            return 1

    def _reap(self, *, restart: bool = True) -> None:
        """Collect dead workers; while running, schedule their replacements."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for index, slot in enumerate(self.slots):
                if slot.pid == pid:
                    if restart:
                        self._died(index, pid, status)
                    else:
                        slot.pid = 0

    def _died(self, index: int, pid: int, status: int) -> None:
        slot = self.slots[index]
        slot.pid = 0
        self.figures.retire(index)
        lived = time.monotonic() - slot.started
        slot.quick_deaths = 0 if lived >= HEALTHY_LIFETIME else slot.quick_deaths + 1
        delay = 0.0 if slot.quick_deaths <= 1 else min(
            0.1 * 2 ** (slot.quick_deaths - 2), RESTART_DELAY_MAX)
        slot.restart_at = time.monotonic() + delay
        how = (f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
               else f"status {os.waitstatus_to_exitcode(status)}")
        log.warning("worker %d (pid %d) died (%s) after %.1f s; restarting in %.1f s",
                    index, pid, how, lived, delay)

    def _wait_time(self) -> float:
        due = [s.restart_at for s in self.slots if s.restart_at is not None]
        return max(0.0, min(due) - time.monotonic()) if due else 60.0

    def _restart_due(self) -> None:
        now = time.monotonic()
        for index, slot in enumerate(self.slots):
            if slot.restart_at is not None and slot.restart_at <= now:
                self.figures.count_restart()
                self._spawn(index)

    def _shut_down(self, signo: int) -> int:
        """Forward the signal; a second one, or the deadline, kills what is left."""
        log.info("%s: stopping %d workers", signal.Signals(signo).name, len(self.slots))
        self._signal_workers(signal.SIGTERM)
        deadline = time.monotonic() + self.config.shutdown_grace + EXIT_MARGIN
        while any(slot.pid for slot in self.slots):
            received = signal.sigtimedwait(SIGNALS, max(0.0, deadline - time.monotonic()))
            self._reap(restart=False)
            forced = received is None or received.si_signo != signal.SIGCHLD
            if forced and any(slot.pid for slot in self.slots):
                log.warning("killing workers that did not stop")
                self._signal_workers(signal.SIGKILL)
                deadline = time.monotonic() + EXIT_MARGIN
        log.info("stopped")
        return 0

    def _signal_workers(self, signo: int) -> None:
        for slot in self.slots:
            if slot.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, signo)


def serve(config: Config) -> int:
    configure(config.log_level, config.log_format)
    limit = raise_open_files_limit()
    if config.insecure:
        log.warning("--insecure: accepting every client without a token; never in production")
    log.info("fastfan on %s:%d, %d worker(s), bus %s, open files limit %d", config.host,
             config.port, config.workers, "embedded" if config.redis is None else "redis", limit)
    log.info("WebSocket layer: picows %s (vendored)", picows_version)
    return Master(config).run()
