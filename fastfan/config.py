"""One frozen Config, validated once: everything a worker needs to know about its options."""

from __future__ import annotations

import math
import os
import re
import ssl
from dataclasses import dataclass, fields
from pathlib import Path
from urllib.parse import urlsplit

from redis.connection import parse_url as parse_redis_url

from . import proxy
from ._core import SlowConsumerPolicy
from .app import load_app
from .history import DEFAULT_MAX_BYTES
from .keys import PublicKey
from .namespaces import Namespace, history_capacity
from .pusher import PusherAppError, parse_apps, read_app_file

# The --slow-consumer names: the core's policies, lower case.
SLOW_CONSUMER_POLICIES = tuple(policy.name.lower() for policy in SlowConsumerPolicy)
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
# RFC 7518 3.2: an HS256 key must be at least as long as the hash output, 256 bits.
MIN_JWT_SECRET_BYTES = 32
# The embedded bus is a full mesh: every worker holds a Unix socket to every other one,
# N*(N-1) connections in all, and each publish with subscribers everywhere is written N-1
# times by its worker. Past a few dozen workers that costs more than another core gives
# (and a 2-core machine took minutes to fork a thousand); scale out with more nodes and
# --redis instead. `auto` stops here too.
MAX_WORKERS = 64
# RFC 9110's token: what --proxy-headers may name
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class ConfigError(ValueError):
    """An option has a value the server cannot run with; the message says which and why."""


@dataclass(frozen=True)
class Config:
    host: str = "0.0.0.0"
    port: int = 8080
    api_host: str | None = None  # None: the same as host
    workers: int = 1
    redis: str | None = None
    redis_prefix: str = "fastfan:"
    jwt_secret: str | None = None
    jwt_public_key: str | None = None  # a PEM file's path
    jwks_url: str | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    insecure: bool = False
    max_message_size: int = 65536
    max_subscriptions: int = 1024
    max_subscription_bytes: int = 65536
    presence_channels: str = "*"  # comma-separated patterns
    presence_limit: int = 1000
    presence_ttl: float = 60.0
    history_size: int = 0  # messages kept per channel; 0: no history
    history_ttl: float = 300.0
    history_channels: str = "*"  # comma-separated patterns
    history_max_bytes: int = DEFAULT_MAX_BYTES  # what history keeps per worker
    publish_rate: int = 1000
    subscribe_rate: int = 20  # subscribes that change something, and presence requests
    max_buffer: int = 1048576
    max_backlog: int = 64 << 20  # output queued and not yet written, all connections
    slow_consumer: str = "disconnect"
    ping_interval: float = 30.0
    ping_timeout: float = 60.0
    shutdown_grace: float = 10.0
    drain_delay: float = 0.0  # SIGTERM to the first close: /ready 503 meanwhile
    stats_interval: float = 60.0
    max_connections: int | None = None  # per worker; None: what the open-files limit allows
    max_connections_per_user: int = 0  # per worker and token user; 0: no limit
    log_level: str = "info"
    log_format: str = "text"
    echo_path: str | None = None
    api_port: int | None = None
    api_key: str | None = None
    api_key_file: str | None = None  # read once, here: its content becomes api_key
    metrics_public: bool = True  # GET /metrics on --port too, not only on --api-port
    compression: bool = True  # permessage-deflate for the clients that offer it
    compression_min_size: int = 256  # smaller messages go out uncompressed
    tls_cert: str | None = None  # PEM files: with both, the port speaks TLS only
    tls_key: str | None = None
    webhook_url: str | None = None  # comma-separated URLs; None: no webhooks
    webhook_secret: str | None = None
    webhook_secret_file: str | None = None  # read once, here: its content becomes the secret
    webhook_vacated_delay: float = 5.0
    webhook_publish: str = ""  # comma-separated channel patterns; "": none
    webhook_connections: bool = False
    webhook_batch: int = 100
    webhook_retry: float = 300.0
    webhook_queue_bytes: int = 16777216
    webhook_format: str = "native"
    pid_file: str | None = None  # the master's pid, for `fastfan reload` and `restart`
    app: str | None = None  # --app package.module:attribute, a fastfan.App
    hook_timeout: float = 1.0
    # the same hooks over HTTP (fastfan.proxy): a URL each, Centrifugo's proxy shapes
    proxy_connect: str | None = None
    proxy_refresh: str | None = None
    proxy_subscribe: str | None = None
    proxy_publish: str | None = None
    proxy_rpc: str | None = None
    proxy_headers: str = proxy.DEFAULT_HEADERS  # the upgrade's headers each request forwards
    proxy_timeout: float = 1.0
    pusher_app: tuple[str, ...] = ()  # ID:KEY:SECRET each (fastfan.pusher)
    pusher_app_file: str | None = None  # read once, here: its lines join pusher_app
    namespaces: tuple[Namespace, ...] = ()  # --config's [[namespace]] tables, in order

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be 0-65535, got {self.port}")
        if not 1 <= self.workers <= MAX_WORKERS:
            raise ConfigError(f"--workers must be 1 to {MAX_WORKERS} (or 'auto'), got "
                              f"{self.workers}: more workers cost more than they give "
                              f"(docs/protocol.md); run more nodes with --redis instead")
        for name in ("max_message_size", "max_subscriptions", "max_subscription_bytes",
                     "presence_limit", "publish_rate", "subscribe_rate", "max_buffer",
                     "max_backlog", "history_max_bytes", "webhook_batch",
                     "webhook_queue_bytes"):
            if getattr(self, name) < 1:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{flag} must be a positive integer, got {getattr(self, name)}")
        if self.max_connections is not None and self.max_connections < 1:
            raise ConfigError("--max-connections must be a positive integer")
        if self.history_size < 0:
            raise ConfigError("--history-size must be 0 (no history) or more")
        if self.max_connections_per_user < 0:
            raise ConfigError("--max-connections-per-user must be 0 (no limit) or more")
        for name in ("ping_interval", "ping_timeout", "shutdown_grace", "stats_interval",
                     "presence_ttl", "history_ttl", "webhook_retry"):
            if getattr(self, name) <= 0:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{flag} must be a positive number of seconds")
        if self.drain_delay < 0:
            raise ConfigError("--drain-delay must be 0 or more seconds")
        if self.slow_consumer not in SLOW_CONSUMER_POLICIES:
            raise ConfigError(
                f"--slow-consumer must be one of {', '.join(SLOW_CONSUMER_POLICIES)}, "
                f"got {self.slow_consumer!r}"
            )
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"--log-level must be one of {', '.join(LOG_LEVELS)}")
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(f"--log-format must be one of {', '.join(LOG_FORMATS)}")
        if self.echo_path is not None and not self.echo_path.startswith("/"):
            raise ConfigError(f"--echo-path must start with '/', got {self.echo_path!r}")
        if self.echo_path in ("/", "/ws", "/health", "/ready", "/metrics"):
            raise ConfigError(f"--echo-path {self.echo_path} is already a fastfan path")
        if self.redis is not None:
            self._check_redis(self.redis)
        if self.compression_min_size < 0:
            raise ConfigError("--compression-min-size must be 0 or more bytes")
        self._check_token_key()
        if self.hook_timeout <= 0:
            raise ConfigError("--hook-timeout must be a positive number of seconds")
        if self.app is not None:
            try:
                load_app(self.app)
            except ValueError as exc:
                raise ConfigError(f"--app {self.app}: {exc}") from None
        self._check_proxies()
        self._check_api()
        self._check_tls()
        self._check_pusher()
        self._check_webhooks()
        for number, namespace in enumerate(self.namespaces, 1):
            problem = namespace.check()
            if problem is not None:
                raise ConfigError(f"namespace {number}: {problem}")

    def _check_redis(self, value: str) -> None:
        """One redis:// or rediss:// URL, or several comma-separated (shards), or a
        redis+cluster:// URL."""
        if value.startswith("redis+cluster://"):
            hosts = value[len("redis+cluster://"):].split("/", 1)[0].rpartition("@")[2]
            for host in hosts.split(","):
                if not host.rpartition(":")[2].isdigit():
                    raise ConfigError(f"--redis redis+cluster:// takes host:port[,host:port"
                                      f"...], got {host!r}")
            return
        urls = [url.strip() for url in value.split(",")]
        for url in urls:
            if not url.startswith(("redis://", "rediss://")):
                raise ConfigError(f"--redis must be a redis:// or rediss:// URL, several "
                                  f"separated by commas, or redis+cluster://host:port[,...], "
                                  f"got {url!r}")
            try:
                parse_redis_url(url)  # type: ignore[no-untyped-call]  # as the bus will
            except ValueError as exc:
                raise ConfigError(f"--redis {url}: {exc}") from None
        if len(set(urls)) != len(urls):
            raise ConfigError(f"--redis names a shard twice: {value!r}")

    def _check_token_key(self) -> None:
        """One way to check tokens (a secret, a public key or a JWKS), or --insecure alone."""
        keys = [flag for flag, value in (("--jwt-secret", self.jwt_secret),
                                         ("--jwt-public-key", self.jwt_public_key),
                                         ("--jwks-url", self.jwks_url)) if value is not None]
        if len(keys) > 1:
            raise ConfigError(f"give one token key, not {' and '.join(keys)}: --jwt-secret "
                              "(or --jwt-secret-file), --jwt-public-key or --jwks-url")
        if keys and self.insecure:
            raise ConfigError(
                f"--insecure with {keys[0]} would let clients without a token in with "
                "every permission: drop --insecure to require tokens (or drop the key "
                "for local development)")
        if not keys and (self.jwt_audience is not None or self.jwt_issuer is not None):
            raise ConfigError("--jwt-audience and --jwt-issuer need a token key: "
                              "--jwt-secret, --jwt-public-key or --jwks-url")
        if self.jwt_secret is not None:
            check_jwt_secret(self.jwt_secret)
        if self.jwt_public_key is not None:
            try:
                PublicKey.from_file(self.jwt_public_key)
            except ValueError as exc:
                raise ConfigError(f"--jwt-public-key {exc}") from None
        if self.jwks_url is not None and not self.jwks_url.startswith(("https://", "http://")):
            raise ConfigError(f"--jwks-url must be an https:// (or http://) URL, got "
                              f"{self.jwks_url!r}")
        for flag, value in (("--jwt-audience", self.jwt_audience),
                            ("--jwt-issuer", self.jwt_issuer)):
            if value is not None and not value:
                raise ConfigError(f"{flag} is empty: give the value tokens must carry")

    def _check_api(self) -> None:
        """--api-port and a key (--api-key or --api-key-file) come together, or not at all."""
        if self.api_key is not None and self.api_key_file is not None:
            raise ConfigError("give --api-key or --api-key-file, not both")
        if self.api_key_file is not None:
            try:
                with open(self.api_key_file) as file:
                    key = file.read().strip()
            except OSError as exc:
                raise ConfigError(f"cannot read --api-key-file: {exc}") from None
            object.__setattr__(self, "api_key", key)  # frozen: set once, while validating
        if (self.api_port is None) != (self.api_key is None):
            raise ConfigError("--api-port and --api-key (or --api-key-file) go together: "
                              "give both to open the server API, or neither")
        if self.api_key is not None and not self.api_key:
            raise ConfigError("the API key is empty: give a secret, e.g. from "
                              "`python -c 'import secrets; print(secrets.token_urlsafe())'`")
        if self.api_port is not None and not 1 <= self.api_port <= 65535:
            raise ConfigError(f"--api-port must be 1-65535, got {self.api_port}")
        if self.api_port is not None and self.api_port == self.port:
            raise ConfigError(f"--api-port must differ from --port ({self.port})")

    def _check_tls(self) -> None:
        """--tls-cert and --tls-key together, and a certificate the key fits, before forking."""
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("--tls-cert and --tls-key go together: give both to serve "
                              "wss:// and https://, or neither")
        if self.tls_cert is not None:
            tls_context(self)

    def _check_webhooks(self) -> None:
        """URLs and a secret (--webhook-secret or --webhook-secret-file) together; in
        Pusher's format, Pusher apps instead (each app's events are signed with its
        secret)."""
        if self.webhook_secret is not None and self.webhook_secret_file is not None:
            raise ConfigError("give --webhook-secret or --webhook-secret-file, not both")
        if self.webhook_secret_file is not None:
            try:
                with open(self.webhook_secret_file, encoding="utf-8") as file:
                    secret = file.read().rstrip("\r\n")
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"cannot read --webhook-secret-file: {exc}") from None
            object.__setattr__(self, "webhook_secret", secret)  # frozen: set once, here
        if self.webhook_url is None:
            return
        for url in self.webhook_url.split(","):
            if not url.strip().startswith(("http://", "https://")):
                raise ConfigError(f"--webhook-url takes http:// or https:// URLs, "
                                  f"comma-separated, got {url.strip()!r}")
        if self.webhook_format == "pusher":
            if not self.pusher_app:
                raise ConfigError("--webhook-format pusher needs --pusher-app: each app's "
                                  "events are signed with its secret")
        elif not self.webhook_secret:
            raise ConfigError("--webhook-url needs --webhook-secret (or --webhook-secret-file): "
                              "every request is signed with it, for the receiver to check")
        if self.webhook_vacated_delay < 0:
            raise ConfigError("--webhook-vacated-delay must be 0 or more seconds")
        if self.webhook_format not in ("native", "pusher"):
            raise ConfigError(f"--webhook-format is 'native' or 'pusher', got "
                              f"{self.webhook_format!r}")

    def _check_pusher(self) -> None:
        """Every --pusher-app (and --pusher-app-file's lines) is ID:KEY:SECRET."""
        apps = tuple(self.pusher_app)
        if self.pusher_app_file is not None:
            try:
                apps += tuple(read_app_file(self.pusher_app_file))
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"cannot read --pusher-app-file: {exc}") from None
        try:
            parse_apps(apps)
        except PusherAppError as exc:
            raise ConfigError(str(exc)) from None
        object.__setattr__(self, "pusher_app", apps)  # frozen: set once, while validating

    def require_auth_choice(self) -> None:
        """`run` needs a way to check tokens, or an explicit decision to skip them (or only
        Pusher apps, whose channels are signed by their own secrets)."""
        if self.jwt_secret is None and self.jwt_public_key is None and self.jwks_url is None \
                and not self.insecure and not self.app_authenticates \
                and self.proxy_connect is None and not self.pusher_app:
            raise ConfigError(
                "no token key given: set --jwt-secret-file (or FASTFAN_JWT_SECRET), "
                "--jwt-public-key or --jwks-url to require client tokens, or pass "
                "--insecure to accept any client (local development only)"
            )

    def _check_proxies(self) -> None:
        """The proxies' URLs, header names and timeout; and that no proxy and no hook of
        --app decide the same."""
        for name in ("connect", "refresh", "subscribe", "publish", "rpc"):
            url = getattr(self, f"proxy_{name}")
            if url is not None and not (url.startswith(("http://", "https://"))
                                        and urlsplit(url).hostname):
                raise ConfigError(f"--proxy-{name} must be an http:// or https:// URL, "
                                  f"got {url!r}")
        if self.proxy_timeout <= 0:
            raise ConfigError("--proxy-timeout must be a positive number of seconds")
        for header in self.proxy_headers.split(","):
            if header.strip() and not _HEADER_NAME.fullmatch(header.strip()):
                raise ConfigError(f"--proxy-headers: {header.strip()!r} is not a header name")
        try:
            proxy.check(self, None if self.app is None else load_app(self.app))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    @property
    def app_authenticates(self) -> bool:
        """--app has an `authenticate` hook: it may replace tokens altogether."""
        return self.app is not None and load_app(self.app).authenticate_hook is not None

    @property
    def api_listen_host(self) -> str:
        """Where the server API listens: --api-host, else --host."""
        return self.host if self.api_host is None else self.api_host

    @property
    def slow_consumer_policy(self) -> SlowConsumerPolicy:
        return SlowConsumerPolicy[self.slow_consumer.upper()]


# What a reload (SIGHUP) changes in running workers; any other option keeps its value
# until a restart. Not max_message_size or presence_limit: the embedded bus sizes its
# records by them once, and a larger record from a reloaded worker would drop the link.
LIVE = frozenset({
    "jwt_secret", "jwt_public_key", "jwks_url", "jwt_audience", "jwt_issuer", "insecure",
    "api_key", "api_key_file", "log_level", "log_format", "max_subscriptions",
    "max_subscription_bytes", "max_buffer", "publish_rate", "subscribe_rate",
    "max_connections", "max_connections_per_user", "ping_interval", "ping_timeout",
    "stats_interval", "shutdown_grace", "drain_delay", "namespaces"})
# Live too when webhooks were on and stay on (turning them on or off needs a restart: the
# bus tells them of transitions from its start).
WEBHOOKS = frozenset({
    "webhook_url", "webhook_secret", "webhook_secret_file", "webhook_vacated_delay",
    "webhook_publish", "webhook_connections", "webhook_batch", "webhook_retry",
    "webhook_queue_bytes", "webhook_format"})


@dataclass(frozen=True)
class Reload:
    """What a reload does: the Config to run with, and which options changed."""

    config: Config  # the new options, those not in LIVE kept as they run
    changed: list[str]  # options now in force
    need_restart: list[str]  # options the file changed that keep their running value


def reload(running: Config, loaded: Config) -> Reload:
    """`loaded` (a Config read anew) applied to `running` (ConfigError if the mix of new
    live options and running others does not hold together, e.g. an API key without the
    API port that needs a restart)."""
    names = [f.name for f in fields(Config)]
    differ = [name for name in names if getattr(running, name) != getattr(loaded, name)]
    live = set(LIVE)
    if running.webhook_url is not None and loaded.webhook_url is not None:
        live |= WEBHOOKS
    if history_capacity(loaded.history_size, loaded.namespaces) > history_capacity(
            running.history_size, running.namespaces):
        live.discard("namespaces")  # the history stores are sized at start
    kept = {name: getattr(running, name) for name in names if name not in live}
    options = {name: getattr(loaded, name) for name in names if name in live}
    if options["api_key_file"] is not None:
        options["api_key"] = None  # read from the file again, by Config
    if options.get("webhook_secret_file") is not None:
        options["webhook_secret"] = None
    return Reload(Config(**kept, **options), [n for n in differ if n in live],
                  [n for n in differ if n not in live])


def check_jwt_secret(secret: str) -> None:
    """A short HS256 secret can be found by brute force; refuse it before it signs anything."""
    size = len(secret.encode())
    if size < MIN_JWT_SECRET_BYTES:
        raise ConfigError(
            f"the JWT secret is {size} bytes; HS256 needs at least {MIN_JWT_SECRET_BYTES} "
            f"(RFC 7518 3.2): make one with `openssl rand -base64 32`")


def tls_context(config: Config) -> ssl.SSLContext:
    """The server's TLS context for --tls-cert and --tls-key (ConfigError if they do not load)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(str(config.tls_cert), str(config.tls_key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load --tls-cert {config.tls_cert} with --tls-key "
                          f"{config.tls_key}: {exc}") from None
    return context


def cpu_count(proc: Path = Path("/proc/self")) -> int:
    """The CPUs this process may use, what `--workers auto` starts: its affinity, at most
    its cgroups' CPU quota rounded up (in a 2-CPU container on a 64-core host, 2), and at
    most MAX_WORKERS."""
    cpus = min(len(os.sched_getaffinity(0)), MAX_WORKERS)
    quota = cgroup_cpu_quota(proc)
    return cpus if quota is None else max(1, min(cpus, math.ceil(quota)))


def cgroup_cpu_quota(proc: Path = Path("/proc/self")) -> float | None:
    """The CPUs' worth of time the cgroups of the process `proc` allow, the lowest along
    each path up to its hierarchy's root (cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us` /
    `cpu.cfs_period_us`), or None without a quota or a readable cgroup file system."""
    try:
        mounts = _cgroup_mounts((proc / "mountinfo").read_text())
        memberships = (proc / "cgroup").read_text().splitlines()
    except OSError:
        return None
    quotas = []
    for line in memberships:
        hierarchy, controllers, path = line.split(":", 2)
        version = "v2" if hierarchy == "0" else "v1" if "cpu" in controllers.split(",") else ""
        if version in mounts:
            root, mount_point = mounts[version]
            relative = os.path.relpath(path, root) if path.startswith(root) else "."
            quotas += _quotas_up_to(mount_point, os.path.normpath(
                os.path.join(mount_point, relative)), version)
    return min(quotas) if quotas else None


def _cgroup_mounts(mountinfo: str) -> dict[str, tuple[str, str]]:
    """Where cgroup v2, and v1's cpu controller, are mounted: version -> (the cgroup
    path at the mount's root, the mount point). (proc(5): mountinfo's fields.)"""
    mounts = {}
    for line in mountinfo.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        after = fields[fields.index("-") + 1:]
        if after[0] == "cgroup2":
            mounts["v2"] = (fields[3], fields[4])
        elif after[0] == "cgroup" and "cpu" in after[-1].split(","):
            mounts["v1"] = (fields[3], fields[4])
    return mounts


def _quotas_up_to(mount_point: str, directory: str, version: str) -> list[float]:
    quotas = []
    while True:
        try:
            if version == "v2":
                limit, period = Path(directory, "cpu.max").read_text().split()[:2]
            else:
                limit = Path(directory, "cpu.cfs_quota_us").read_text().strip()
                period = Path(directory, "cpu.cfs_period_us").read_text().strip()
            if limit not in ("max", "-1") and int(period) > 0:
                quotas.append(int(limit) / int(period))
        except (OSError, ValueError):
            pass  # no such file at this level: no quota here
        if os.path.normpath(directory) == os.path.normpath(mount_point) or directory == "/":
            return quotas
        directory = os.path.dirname(directory)
