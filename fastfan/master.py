"""The process `fastfan run` starts: it binds the ports, forks the workers and keeps them
alive.

It does no WebSocket work. Its loop waits for signals (SIGCHLD, SIGTERM, SIGINT, SIGHUP,
SIGUSR1, SIGUSR2) with `sigtimedwait`, so it needs no threads, no event loop, and nothing
to clean up in a child after `os.fork`. It forks one worker per turn of that loop, so a
signal is honoured between two forks as at any other time.

SIGHUP reloads: the master reads the configuration again (`load`: the config file under
the same flags and environment) and, if it holds, sends SIGHUP to every worker, which
reads it too and applies what can change live (config.LIVE); a file that does not hold
changes nothing. SIGUSR2 replaces the workers one at a time: a new worker in the old
one's place, on the same listening sockets; once it serves (it says so on a pipe, and
wakes the master with SIGUSR1), the old one gets SIGUSR2, stops accepting, closes its
clients with 1012 and exits; then the next.

The listening sockets are made here, before the first fork (`listen`), so a port that is
not ours is a usage error (exit 2) and not a worker dying over and over. Each worker gets
its own socket with SO_REUSEPORT, as if it had bound the port itself, so the kernel still
spreads connections across workers by their hash (one shared socket would wake every
worker for every connection and leave the spreading to whichever wakes first). A fresh
SO_REUSEPORT socket of the same user could join that group, so before binding them a
probe binds the port without SO_REUSEPORT: it fails if anything listens there, another
fastfan included, which then refuses to start instead of taking a share of the traffic.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import gc
import logging
import os
import resource
import secrets
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import proxy
from ._picows.version import __version__ as picows_version
from .app import load_app
from .config import Config, ConfigError, reload
from .logs import configure
from .metrics import SharedFigures
from .worker import LISTEN_BACKLOG, Placement, run_worker

log = logging.getLogger("fastfan.master")

SIGNALS = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1,
           signal.SIGUSR2}
STOPPING = {signal.SIGTERM, signal.SIGINT}
# A worker that lived this long before dying is replaced at once; one that dies sooner
# may keep dying, and waits 0.1 s, 0.2 s, 0.4 s, 0.8 s between tries. At its sixth quick
# death in a row it will not start (a bad host, a bug): the server stops, exit status 1,
# with its reason, rather than loop forever: a few seconds in all.
HEALTHY_LIFETIME = 10.0
START_ATTEMPTS = 6
# Beyond the shutdown grace, how long workers get to exit before they are killed.
EXIT_MARGIN = 5.0
PR_SET_PDEATHSIG = 1


def raise_open_files_limit() -> int:
    """Each connection is a file descriptor: take every one the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def listen(host: str, port: int, count: int, options: tuple[str, str]) -> list[
        list[socket.socket]]:
    """`count` sets of listening sockets on host:port (one per address `host` names), one
    set per worker, or ConfigError naming `options` (the host's and the port's flags)."""
    host_flag = options[0]
    try:
        addresses = list(dict.fromkeys(
            (family, address[:2]) for family, _, _, _, address in socket.getaddrinfo(
                host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)))
    except socket.gaierror as exc:
        raise ConfigError(f"{host_flag} {host}: not an address ({exc.strerror})") from None
    sets: list[list[socket.socket]] = [[] for _ in range(count)]
    try:
        for family, address in addresses:
            probe = _socket(family, reuse_port=False)
            try:
                probe.bind(address)
                # Port 0: every worker's socket on the port the kernel chose for the probe.
                bound = (address[0], probe.getsockname()[1])
                for listening in sets:
                    listening.append(_socket(family, reuse_port=True))
                    listening[-1].bind(bound)
                    listening[-1].listen(LISTEN_BACKLOG)
            finally:
                probe.close()
    except OSError as exc:
        for listening in sets:
            for sock in listening:
                sock.close()
        raise ConfigError(_why_not(exc, host, port, options)) from None
    return sets


def _socket(family: int, *, reuse_port: bool) -> socket.socket:
    """A TCP socket set up as asyncio's create_server sets up its own."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.setblocking(False)
    return sock


def _why_not(exc: OSError, host: str, port: int, options: tuple[str, str]) -> str:
    host_flag, port_flag = options
    if exc.errno == errno.EADDRINUSE:
        return (f"{port_flag} {port}: the port is in use on {host} by another process "
                f"(another fastfan?): stop it or choose another port")
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{host_flag} {host}: not an address of this host"
    if exc.errno == errno.EACCES:
        return (f"{port_flag} {port}: permission denied (ports below 1024 need root or "
                f"CAP_NET_BIND_SERVICE)")
    return f"{host_flag} {host} {port_flag} {port}: cannot listen: {exc.strerror}"


@dataclass
class Child:
    """The master's record of one worker, by its index: the process now in its place."""

    pid: int = 0
    started: float = 0.0
    quick_deaths: int = 0
    restart_at: float | None = None
    # The worker's clientIds begin with this; its replacement is told the one before, to
    # clear what its clients left behind elsewhere (presence in Redis).
    client_id_prefix: str = ""
    # Why the worker last died: the exception it wrote to the master, or how it ended.
    reason: str = ""
    sockets: list[socket.socket] = field(default_factory=list)  # for its client port
    api_sockets: list[socket.socket] = field(default_factory=list)


class Master:
    def __init__(self, config: Config, load: Callable[[], Config]) -> None:
        self.config = config
        self._load = load  # the configuration read again, for a reload
        self.pid = os.getpid()
        self.figures = SharedFigures(config.workers)
        self.children = [Child() for _ in range(config.workers)]
        # The embedded bus's sockets, reachable by our uid only (see fastfan/bus/mesh).
        self.mesh_sockets = ""
        # Where a failing worker writes why, one line `index reason`, before it exits.
        self._reasons, self._reason_sink = os.pipe2(os.O_NONBLOCK)
        # Where a worker writes its pid once it serves (then SIGUSR1 wakes us): a pipe
        # keeps every line, where two signals at once would be one.
        self._serving, self._serving_sink = os.pipe2(os.O_NONBLOCK)
        self._failed = ""  # a worker that will not start: the server stops with this
        # A rolling restart: the indexes still to replace, the old worker's pid and index
        # while its replacement starts, and the old workers told to leave.
        self._to_replace: list[int] = []
        self._replacing: tuple[int, int] | None = None
        self._leaving: dict[int, int] = {}

    def listen(self) -> None:
        """Bind every port before the first fork: ConfigError if one is not ours to take."""
        config = self.config
        for child, sockets in zip(self.children, listen(
                config.host, config.port, config.workers, ("--host", "--port")), strict=True):
            child.sockets = sockets
        if config.api_port is not None:
            host_flag = "--host" if config.api_host is None else "--api-host"
            for child, sockets in zip(self.children, listen(
                    config.api_listen_host, config.api_port, config.workers,
                    (host_flag, "--api-port")), strict=True):
                child.api_sockets = sockets

    def run(self) -> int:
        """Fork and supervise the workers until a signal (exit status 0) or a worker that
        will not start (1). SIGNALS are blocked already (serve)."""
        if self.config.workers > 1 and self.config.redis is None:
            self.mesh_sockets = tempfile.mkdtemp(prefix="fastfan-bus-")
        try:
            now = time.monotonic()
            for child in self.children:
                child.restart_at = now
            while True:
                received = signal.sigtimedwait(SIGNALS, self._wait_time())
                self._reap()
                signo = None if received is None else received.si_signo
                if signo in STOPPING:
                    self._shut_down(signal.Signals(signo).name)
                    return 0
                if self._failed:
                    log.error("%s", self._failed)
                    self._shut_down("a worker will not start")
                    return 1
                if signo == signal.SIGHUP:
                    self._reload()
                elif signo == signal.SIGUSR2:
                    self._start_rolling_restart()
                self._roll()
                self._restart_due()
        finally:
            if self.mesh_sockets:
                shutil.rmtree(self.mesh_sockets, ignore_errors=True)

    def _reload(self) -> None:
        """SIGHUP: the configuration read again, applied here and in every worker."""
        try:
            done = reload(self.config, self._load())
        except ConfigError as exc:
            log.error("reload refused, nothing changed: %s", exc)
            return
        self.config = done.config  # what workers forked from now on start with
        configure(done.config.log_level, done.config.log_format)
        log.info("reload: %s", ", ".join(done.changed) or "nothing changed")
        if done.need_restart:
            log.warning("reload: %s changed in the file; a restart applies %s",
                        ", ".join(done.need_restart),
                        "it" if len(done.need_restart) == 1 else "them")
        self._signal_workers(signal.SIGHUP)

    def _start_rolling_restart(self) -> None:
        if self._to_replace or self._replacing or self._leaving:
            log.warning("SIGUSR2: a rolling restart is under way already")
            return
        log.info("SIGUSR2: replacing %d workers one at a time", len(self.children))
        self._to_replace = list(range(len(self.children)))

    def _roll(self) -> None:
        """The rolling restart's next step, if its last one is done."""
        self._read_serving()
        if self._replacing is not None or self._leaving or not self._to_replace:
            return
        index = self._to_replace.pop(0)
        old = self.children[index].pid
        if not old:
            return  # dead: its replacement comes as any dead worker's does
        self._spawn(index, replacing=True)
        self._replacing = (old, index)

    def _read_serving(self) -> None:
        """Pids of workers that serve now: the one a rolling restart waits for sends the
        worker it replaces away (SIGUSR2)."""
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self._serving, 65536):
                for line in chunk.decode().split():
                    if self._replacing is None:
                        continue
                    old, index = self._replacing
                    if line.isdigit() and int(line) == self.children[index].pid:
                        self._replacing = None
                        if old:  # 0: it died meanwhile
                            self._leaving[old] = index
                            with contextlib.suppress(ProcessLookupError):
                                os.kill(old, signal.SIGUSR2)
                        log.info("worker %d: pid %s serves; pid %d leaves", index, line, old)
                        if not self._to_replace:
                            log.info("rolling restart: the last worker is replaced")

    def _spawn(self, index: int, *, replacing: bool = False) -> None:
        """A worker forked in `index`'s place: after one died, or `replacing` one that
        still runs (and clears its own presence as it leaves)."""
        child = self.children[index]
        previous, child.client_id_prefix = child.client_id_prefix, secrets.token_hex(6)
        if replacing:
            previous = ""
        # Frozen, the master's objects are never walked by a worker's collections, whose
        # writes to their headers would copy the pages the workers share with the master.
        gc.freeze()
        pid = os.fork()
        if pid == 0:
            os._exit(self._child(index, previous))
        self.children[index].pid = pid
        self.children[index].started = time.monotonic()
        self.children[index].restart_at = None

    def _child(self, index: int, previous_prefix: str) -> int:
        """The worker's life, in the forked child; returns its exit status."""
        try:
            # A reload before the worker's loop handles SIGHUP must not end it (the
            # default action); it starts with the master's configuration as reloaded.
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
            # If the master dies, even by SIGKILL, the kernel sends us SIGTERM.
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != self.pid:
                return 0  # the master died before prctl took effect
            child = self.children[index]
            run_worker(self.config, Placement(
                index, self.pid, self.figures, self.mesh_sockets,
                client_id_prefix=child.client_id_prefix,
                previous_client_id_prefix=previous_prefix, serving_fd=self._serving_sink,
                load=self._load), child.sockets, child.api_sockets)
            return 0
        except BaseException as exc:
            log.exception("worker %d failed", index)
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:400]
            with contextlib.suppress(OSError):
                os.write(self._reason_sink, f"{index} {reason}\n".encode())  # < PIPE_BUF
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
            if pid in self._leaving or (self._replacing and self._replacing[0] == pid):
                self._left(pid)
                continue
            for index, child in enumerate(self.children):
                if child.pid == pid:
                    if restart:
                        self._died(index, pid, status)
                    else:
                        child.pid = 0

    def _left(self, pid: int) -> None:
        """A worker a rolling restart replaced is gone (or died while replaced)."""
        if self._replacing and self._replacing[0] == pid:
            self._replacing = (0, self._replacing[1])  # the replacement still starts
        self._leaving.pop(pid, None)

    def _died(self, index: int, pid: int, status: int) -> None:
        child = self.children[index]
        child.pid = 0
        self.figures.retire(index)
        lived = time.monotonic() - child.started
        child.quick_deaths = 0 if lived >= HEALTHY_LIFETIME else child.quick_deaths + 1
        delay = 0.0 if child.quick_deaths <= 1 else 0.1 * 2 ** (child.quick_deaths - 2)
        how = (f"signal {signal.Signals(os.WTERMSIG(status)).name}" if os.WIFSIGNALED(status)
               else f"status {os.waitstatus_to_exitcode(status)}")
        self._read_reasons()
        reason = child.reason or how
        child.reason = ""
        if child.quick_deaths >= START_ATTEMPTS:
            self._failed = (f"worker {index} died {child.quick_deaths} times in a row within "
                            f"{HEALTHY_LIFETIME:.0f} s of starting, last: {reason}")
            return
        child.restart_at = time.monotonic() + delay
        log.warning("worker %d (pid %d) died (%s) after %.1f s; restarting in %.1f s",
                    index, pid, how, lived, delay)

    def _read_reasons(self) -> None:
        """Take what failing workers wrote (`index reason` lines) into their Child."""
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self._reasons, 65536):
                for line in chunk.decode(errors="replace").splitlines():
                    index, _, reason = line.partition(" ")
                    if index.isdigit() and int(index) < len(self.children):
                        self.children[int(index)].reason = reason

    def _wait_time(self) -> float:
        due = [s.restart_at for s in self.children if s.restart_at is not None]
        return max(0.0, min(due) - time.monotonic()) if due else 60.0

    def _restart_due(self) -> None:
        """Fork the first worker due, one per turn of `run`'s loop: a signal that comes
        while dozens are forked is seen before the next fork."""
        now = time.monotonic()
        for index, child in enumerate(self.children):
            if child.restart_at is not None and child.restart_at <= now:
                if child.started:
                    self.figures.count_restart()
                self._spawn(index)
                return

    def _shut_down(self, why: str) -> None:
        """SIGTERM to every worker; a second signal, or the deadline, kills what is left."""
        log.info("%s: stopping %d workers", why, sum(1 for child in self.children if child.pid))
        self._signal_workers(signal.SIGTERM)
        deadline = time.monotonic() + self.config.drain_delay + self.config.shutdown_grace \
            + EXIT_MARGIN
        while any(child.pid for child in self.children) or self._leaving \
                or (self._replacing and self._replacing[0]):
            received = signal.sigtimedwait(SIGNALS, max(0.0, deadline - time.monotonic()))
            self._reap(restart=False)
            # A second SIGTERM or SIGINT, or the deadline; a reload or a worker that says
            # it serves meanwhile changes nothing.
            forced = received is None or received.si_signo in STOPPING
            if forced:
                log.warning("killing workers that did not stop")
                self._signal_workers(signal.SIGKILL)
                deadline = time.monotonic() + EXIT_MARGIN
        log.info("stopped")

    def _signal_workers(self, signo: int) -> None:
        """`signo` to every worker, those a rolling restart sends away too."""
        replaced = [self._replacing[0]] if self._replacing and self._replacing[0] else []
        for pid in [child.pid for child in self.children if child.pid] + replaced \
                + list(self._leaving):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signo)


def serve(config: Config, load: Callable[[], Config]) -> int:
    """Run the server; ConfigError, before anything is logged, if a port is not ours.
    `load` reads the configuration again (for a reload, SIGHUP)."""
    # From here a signal waits for the master's loop, which honours it between two forks;
    # the workers unblock them (Master._child).
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    if config.webhook_url is not None or proxy.configured(config):
        # Their HTTP client, loaded once before the forks: a worker (a restarted one too)
        # is up at once, not 0.3 s later; without them no worker loads it (~16 MiB each).
        import aiohttp  # noqa: F401
    master = Master(config, load)
    master.listen()
    if config.pid_file is not None:
        _write_pid_file(config.pid_file)
    configure(config.log_level, config.log_format)
    limit = raise_open_files_limit()
    if config.insecure:
        log.warning("--insecure: accepting every client without a token; never in production")
    log.info("fastfan on %s:%d, %d worker(s), bus %s, open files limit %d", config.host,
             config.port, config.workers, bus_name(config), limit)
    log.info("WebSocket layer: picows %s (vendored)", picows_version)
    log.info("%s", features_on(config))
    if config.app is not None:
        log.info("hooks: --app %s (%s), --hook-timeout %g s", config.app,
                 ", ".join(load_app(config.app).hooks()) or "none", config.hook_timeout)
    if proxy.configured(config):
        log.info("proxies: %s, --proxy-timeout %g s, forwarding %s", proxy.describe(config),
                 config.proxy_timeout, config.proxy_headers or "no header")
    try:
        return master.run()
    finally:
        if config.pid_file is not None:
            with contextlib.suppress(OSError):
                os.unlink(config.pid_file)


def bus_name(config: Config) -> str:
    if config.redis is None:
        return "embedded"
    if config.redis.startswith("redis+cluster://"):
        return "redis cluster"
    shards = len(config.redis.split(","))
    return "redis" if shards == 1 else f"redis, {shards} shards"


def features_on(config: Config) -> str:
    """What is on, in one line for the start-up log: TLS, compression, history, webhooks."""
    tls = f"TLS on ({config.tls_cert})" if config.tls_cert else "TLS off"
    compression = (f"compression on (messages of {config.compression_min_size} bytes or more)"
                   if config.compression else "compression off")
    history = (f"history on ({config.history_size} messages per channel matching "
               f"{config.history_channels}, {config.history_ttl:g} s)"
               if config.history_size else "history off")
    webhooks = (f"webhooks on ({len(config.webhook_url.split(','))} URL(s))"
                if config.webhook_url else "webhooks off")
    return f"{tls}; {compression}; {history}; {webhooks}"


def _write_pid_file(path: str) -> None:
    """The master's pid, for `fastfan reload` and `fastfan restart` (ConfigError if the
    file cannot be written)."""
    try:
        Path(path).write_text(f"{os.getpid()}\n")
    except OSError as exc:
        raise ConfigError(f"--pid-file {path}: cannot write it: {exc.strerror}") from None
