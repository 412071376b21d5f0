"""Arguments, environment and the config file → Config; the `run`, `token`, `publish`,
`config`, `reload` and `restart` commands.

Every `run` option also reads FASTFAN_<OPTION> (upper case, dashes as underscores) and the
key <option> (underscores) of the `--config` file: a flag given on the command line wins
over the environment, which wins over the file, which wins over the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any, NoReturn
from urllib.parse import urlsplit

from . import __version__
from .config import (
    LOG_FORMATS,
    LOG_LEVELS,
    MAX_WORKERS,
    SLOW_CONSUMER_POLICIES,
    Config,
    ConfigError,
    check_jwt_secret,
    cpu_count,
)
from .config_file import FileOption, read_config_file


def _workers(text: str) -> int:
    if text == "auto":
        return cpu_count()
    return _positive_int(text)  # its bound, MAX_WORKERS, is Config's to check


def _whole_number(minimum: int, expected: str) -> Callable[[str], int]:
    """A parser of whole numbers from `minimum` on; `expected` names them in its error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return parse


_positive_int = _whole_number(1, "a positive number")
_non_negative_int = _whole_number(0, "0 or more")


def _json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected JSON, got {text!r}") from None


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 0 to 65535, got {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _non_negative_seconds(text: str) -> float:
    """Seconds, or 0 for none."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more seconds, got {text!r}")
    return value


def _on_off(text: str) -> bool:
    if text in ("on", "off"):
        return text == "on"
    raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")


def _path(text: str) -> str:
    if not text.startswith("/"):
        raise argparse.ArgumentTypeError(f"expected a path starting with '/', got {text!r}")
    return text


_SECRET_HELP = ("HS256 secret for client tokens, at least 32 bytes; a flag is visible to "
                "every user in `ps`: prefer FASTFAN_JWT_SECRET or --jwt-secret-file")
_SECRET_FILE_HELP = "file holding the HS256 secret (trailing newline ignored)"

# (flag, parse, choices, help). The Config field, and the config file's key, is the flag
# without dashes; the --jwt-secret-file's secret goes to jwt_secret (see _jwt_secret).
_RUN_OPTIONS: list[tuple[str, Callable[[str], Any], Sequence[str] | None, str]] = [
    ("--host", str, None, "listen address (default 0.0.0.0)"),
    ("--port", _port, None, "port for WebSocket, health and metrics (default 8080)"),
    ("--workers", _workers, None,
     f"worker processes, 1 to {MAX_WORKERS}, or 'auto' for one per CPU (default 1)"),
    ("--redis", str, None,
     "Redis URL (redis:// or rediss://); several, comma-separated, are shards (each channel "
     "on one); redis+cluster://host:port[,host:port...] for Redis Cluster; "
     "unset: the embedded bus"),
    ("--redis-prefix", str, None, "prefix of Redis channel names (default fastfan:)"),
    ("--jwt-secret", str, None, _SECRET_HELP),
    ("--jwt-secret-file", str, None, _SECRET_FILE_HELP),
    ("--jwt-public-key", str, None,
     "PEM file of an identity provider's public key: RS256, ES256 or EdDSA by its type"),
    ("--jwks-url", str, None, "an identity provider's JWKS URL: keys by the token's kid"),
    ("--jwt-audience", str, None, "the 'aud' every token must name (default: no 'aud')"),
    ("--jwt-issuer", str, None, "the 'iss' every token must carry (default: not checked)"),
    ("--max-message-size", _positive_int, None, "largest client message in bytes (65536)"),
    ("--max-subscriptions", _positive_int, None, "channels one connection may hold (1024)"),
    ("--presence-channels", str, None,
     "comma-separated channel patterns with presence (default *: every channel)"),
    ("--presence-limit", _positive_int, None, "most clients one presence answer lists (1000)"),
    ("--presence-ttl", _seconds, None,
     "seconds before a dead node's clients leave presence (60; with --redis)"),
    ("--history-size", _non_negative_int, None,
     "messages kept per channel for history and recovery (0: no history)"),
    ("--history-ttl", _seconds, None, "seconds a message is kept for history (300)"),
    ("--history-channels", str, None,
     "comma-separated channel patterns with history (default *: every channel)"),
    ("--history-max-bytes", _positive_int, None,
     "bytes of history one worker keeps; past it history publishes get 507 (67108864)"),
    ("--max-subscription-bytes", _positive_int, None,
     "bytes of channel names one connection may hold (65536)"),
    ("--publish-rate", _positive_int, None, "publishes per second per connection (1000)"),
    ("--subscribe-rate", _positive_int, None,
     "subscribes, and presence requests, per second per connection (20)"),
    ("--max-buffer", _positive_int, None, "bytes queued for one connection that does not "
     "read (1048576)"),
    ("--max-backlog", _positive_int, None, "bytes queued for all connections and not yet "
     "written, past which input is held back (67108864)"),
    ("--slow-consumer", str, SLOW_CONSUMER_POLICIES, "policy past --max-buffer (disconnect)"),
    ("--ping-interval", _seconds, None, "seconds of silence before a ping (30)"),
    ("--ping-timeout", _seconds, None, "seconds without an answer before closing (60)"),
    ("--shutdown-grace", _seconds, None,
     "seconds to close every client (1001) on SIGTERM, spread over its first half (10)"),
    ("--drain-delay", _non_negative_seconds, None,
     "seconds between SIGTERM and the first close, /ready answering 503 meanwhile (0)"),
    ("--pid-file", str, None, "a file to write the master's pid to, for fastfan reload "
                              "and fastfan restart"),
    ("--max-connections", _positive_int, None,
     "connections per worker before upgrades get 503 (default: the open-files limit less 256)"),
    ("--max-connections-per-user", _non_negative_int, None,
     "connections of one token's user per worker before upgrades get 429 (0: no limit)"),
    ("--stats-interval", _seconds, None, "seconds between the message-handling stats lines (60)"),
    ("--log-level", str, LOG_LEVELS, "what the log shows (info)"),
    ("--log-format", str, LOG_FORMATS, "one line of text, or of JSON, per event (text)"),
    ("--echo-path", _path, None, "a path that echoes every message, for conformance suites"),
    ("--api-port", _port, None, "port of the server API for backends (with --api-key)"),
    ("--api-host", str, None,
     "listen address of the server API (default: --host), e.g. 127.0.0.1 for backends on "
     "this host while clients come on 0.0.0.0"),
    ("--api-key", str, None, "the server API's key (clients send 'Authorization: apikey KEY')"),
    ("--api-key-file", str, None, "a file holding the API key (instead of --api-key)"),
    ("--metrics-public", _on_off, None, "GET /metrics on --port too (on)"),
    ("--compression", _on_off, None,
     "permessage-deflate for clients that offer it, compressed once per message (on)"),
    ("--compression-min-size", _non_negative_int, None,
     "smallest message in bytes sent compressed (256)"),
    ("--tls-cert", str, None, "PEM certificate (chain): the port speaks TLS only (wss, https)"),
    ("--tls-key", str, None, "PEM private key of --tls-cert"),
    ("--webhook-url", str, None,
     "URL(s), comma-separated, that get every webhook event as signed JSON POSTs"),
    ("--webhook-secret", str, None, "the secret signing webhook requests (X-Fastfan-Signature)"),
    ("--webhook-secret-file", str, None, "a file holding the webhook secret"),
    ("--webhook-vacated-delay", _non_negative_seconds, None,
     "seconds channel_vacated waits, dropped if the channel fills again (5)"),
    ("--webhook-publish", str, None,
     "comma-separated channel patterns whose client publishes are sent (default: none)"),
    ("--webhook-connections", _on_off, None, "send connection_closed events (off)"),
    ("--webhook-batch", _positive_int, None, "most events in one webhook request (100)"),
    ("--webhook-retry", _seconds, None,
     "seconds a failed webhook request is retried; older events are dropped (300)"),
    ("--webhook-queue-bytes", _positive_int, None,
     "bytes of undelivered events per URL; past it the oldest are dropped (16777216)"),
    ("--webhook-format", str, ("native", "pusher"), "webhook events' format (native)"),
    ("--pusher-app-file", _path, None,
     "a file of Pusher apps, one ID:KEY:SECRET a line (see --pusher-app)"),
    ("--app", str, None,
     "the application's hooks: package.module:attribute naming a fastfan.App (docs/hooks.md)"),
    ("--hook-timeout", _seconds, None, "seconds each hook may take (default 1)"),
    ("--proxy-connect", str, None,
     "URL: decides connections without a valid token, as Centrifugo's connect proxy"),
    ("--proxy-refresh", str, None, "URL: extends a connection whose expire_at passes"),
    ("--proxy-subscribe", str, None, "URL: decides each subscribe"),
    ("--proxy-publish", str, None, "URL: decides, and may rewrite, each client publish"),
    ("--proxy-rpc", str, None, "URL: answers each rpc no --app method answers"),
    ("--proxy-headers", str, None,
     "headers of the client's upgrade forwarded on every proxy request "
     "(default Cookie,Authorization,User-Agent,X-Forwarded-For,X-Real-Ip)"),
    ("--proxy-timeout", _seconds, None, "seconds a proxy has for its whole answer (1)"),
]

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")
# What each parser takes in the config file (config_file.FileOption): a TOML type first.
_FILE_KINDS: dict[Callable[[str], Any], type] = {
    _on_off: bool, _port: int, _positive_int: int, _non_negative_int: int, _workers: int,
    _seconds: float, _non_negative_seconds: float, str: str, _path: str}
# The config file's keys: every `run` option, --insecure too.
FILE_OPTIONS = {
    **{flag[2:].replace("-", "_"): FileOption(parse, choices, _FILE_KINDS[parse],
                                              ("auto",) if parse is _workers else ())
       for flag, parse, choices, _ in _RUN_OPTIONS},
    "insecure": FileOption(str, None, bool)}
# Options given two ways (the value, or a file holding it): a layer that gives either one
# decides for both, so FASTFAN_JWT_SECRET replaces the file's jwt_secret_file.
_ONE_OF = (("jwt_secret", "jwt_secret_file"), ("api_key", "api_key_file"))
# Printed as *** by `fastfan config show` (and each Pusher app's secret, ID:KEY:***).
SECRETS = ("jwt_secret", "api_key", "webhook_secret")


def _env_name(flag: str) -> str:
    return "FASTFAN_" + flag.lstrip("-").replace("-", "_").upper()


class _Parser(argparse.ArgumentParser):
    """argparse, but every error is one usage line, one reason line, and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _env_default(parser: argparse.ArgumentParser, flag: str, parse: Callable[[str], Any],
                 choices: Sequence[str] | None) -> Any:
    raw = os.environ.get(_env_name(flag))
    if raw is None:
        return None
    try:
        value = parse(raw)
    except argparse.ArgumentTypeError as exc:
        parser.error(f"{_env_name(flag)}: {exc}")
    if choices is not None and value not in choices:
        parser.error(f"{_env_name(flag)}: expected one of {', '.join(choices)}, got {raw!r}")
    return value


def _env_flag(parser: argparse.ArgumentParser, flag: str) -> bool | None:
    """A switch's environment variable: True, False, or None when it is not set."""
    if _env_name(flag) not in os.environ:
        return None
    raw = os.environ[_env_name(flag)].strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    parser.error(f"{_env_name(flag)}: expected true or false, got {raw!r}")


def _environment(parser: argparse.ArgumentParser) -> dict[str, Any]:
    """`run`'s options as the environment gives them (None: not set)."""
    given = {flag[2:].replace("-", "_"): _env_default(parser, flag, parse, choices)
             for flag, parse, choices, _ in _RUN_OPTIONS}
    return {**given, "insecure": _env_flag(parser, "--insecure")}


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    """`run`'s options, each defaulting to its environment variable (None when unset)."""
    parser.add_argument("--config", metavar="FILE", default=os.environ.get("FASTFAN_CONFIG"),
                        help="a TOML file of these options, keys with '_' for '-' "
                             "(flags and FASTFAN_* win over it) [FASTFAN_CONFIG]")
    for flag, parse, choices, help_text in _RUN_OPTIONS:
        parser.add_argument(flag, type=parse, choices=choices, metavar=_values(parse, choices),
                            help=f"{help_text} [{_env_name(flag)}]",
                            default=_env_default(parser, flag, parse, choices))
    parser.add_argument("--pusher-app", action="append", metavar="ID:KEY:SECRET",
                        help="a Pusher app served on /app/KEY and /apps/ID (repeatable); a "
                             "flag is visible in `ps`: prefer --pusher-app-file")
    parser.add_argument("--insecure", action="store_true",
                        default=_env_flag(parser, "--insecure"),
                        help="accept connections without a token (local development only; "
                             "not with a token key) [FASTFAN_INSECURE=true]")


def _add_pid_file(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pid-file", required=_env_name("--pid-file") not in os.environ,
                        default=os.environ.get(_env_name("--pid-file")),
                        help="the file `fastfan run --pid-file` wrote [FASTFAN_PID_FILE]")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastfan", description="WebSocket publish/subscribe server for fan-out")
    parser.add_argument("--version", action="version", version=f"fastfan {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    # Each command's errors show that command's usage (args.parser).
    run = commands.add_parser("run", help="start the server")
    run.set_defaults(parser=run)
    _add_run_options(run)

    token = commands.add_parser("token", help="print a signed client token")
    token.set_defaults(parser=token)
    token.add_argument("--jwt-secret", default=os.environ.get(_env_name("--jwt-secret")),
                       help=_SECRET_HELP)
    token.add_argument("--jwt-secret-file", help=_SECRET_FILE_HELP,
                       default=os.environ.get(_env_name("--jwt-secret-file")))
    token.add_argument("--sub", required=True, help="the user the token is for")
    token.add_argument("--subscribe", action="append", metavar="PATTERN",
                       help="channel pattern the user may subscribe to (repeatable; default *)")
    token.add_argument("--publish", action="append", metavar="PATTERN",
                       help="channel pattern the user may publish to (repeatable; default *)")
    token.add_argument("--ttl", type=_positive_int, default=3600,
                       help="seconds until the token expires (default 3600)")
    token.add_argument("--info", type=_json_value, metavar="JSON",
                       help="what others see of the user in presence and join/leave, "
                            "e.g. '{\"name\":\"Alice\"}' (at most 1 KiB)")
    publish = commands.add_parser("publish", help="publish a message through the server API")
    publish.set_defaults(parser=publish)
    publish.add_argument("--api", required=True, metavar="URL",
                         help="the server API, e.g. http://127.0.0.1:9090")
    publish.add_argument("--api-key", default=os.environ.get(_env_name("--api-key")),
                         help="the server's API key (or FASTFAN_API_KEY)")
    publish.add_argument("--api-key-file", metavar="FILE",
                         help="a file holding the API key, as `run` takes it")
    publish.add_argument("channel", help="the channel to publish to")
    publish.add_argument("data", metavar="JSON", help="the message's data, any JSON value")

    config = commands.add_parser("config", help="check a config file, or show the "
                                                "configuration run would use")
    config.set_defaults(parser=config)
    actions = config.add_subparsers(dest="action", required=True, parser_class=_Parser)
    check = actions.add_parser("check", help="exit 0 if `run --config FILE` would take the "
                                             "file (in this environment), else 2 and why")
    check.set_defaults(parser=check)
    check.add_argument("file")
    show = actions.add_parser("show", help="print the effective configuration as TOML "
                                           "(secrets as ***); takes run's options")
    show.set_defaults(parser=show)
    _add_run_options(show)

    for name, signal_name, what in (
            ("reload", "SIGHUP", "re-read the config file and apply what can change live"),
            ("restart", "SIGUSR2", "replace the workers one at a time (clients reconnect)")):
        command = commands.add_parser(name, help=f"{what}: {signal_name} to the master")
        command.set_defaults(parser=command, signal=getattr(signal, signal_name))
        _add_pid_file(command)
    return parser


def _values(parse: Callable[[str], Any], choices: Sequence[str] | None) -> str | None:
    """What --help shows an option takes, when it is one of a few words: `on|off`."""
    if parse is _on_off:
        return "on|off"
    return "|".join(choices) if choices else None


def _jwt_secret(secret: str | None, secret_file: str | None) -> str | None:
    """The secret from --jwt-secret or --jwt-secret-file, not both."""
    if secret_file is None:
        return secret
    if secret is not None:
        raise ConfigError("give the secret once: --jwt-secret or --jwt-secret-file "
                          "(FASTFAN_JWT_SECRET or FASTFAN_JWT_SECRET_FILE, jwt_secret or "
                          "jwt_secret_file), not both")
    return _read_secret_file(secret_file)


def _read_secret_file(path: str) -> str:
    """The secret a file holds, without the trailing newline an editor or `echo` leaves."""
    try:
        with open(path, encoding="utf-8") as file:
            return file.read().rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"cannot read the secret file {path} (--jwt-secret-file or "
                          f"FASTFAN_JWT_SECRET_FILE): {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"the secret file {path} is not UTF-8 text: write a printable "
                          "secret, e.g. `openssl rand -base64 32 > FILE`") from None


@dataclass(frozen=True)
class ConfigSource:
    """Where `run`'s options come from: the flags and the environment, fixed for the
    process's life, over the config file, read again at every `load` (a reload)."""

    given: dict[str, Any]  # by Config field (and *_file); None: not given
    path: str | None  # --config

    @staticmethod
    def of(args: argparse.Namespace) -> ConfigSource:
        given = {key: getattr(args, key) for key in FILE_OPTIONS}
        given["pusher_app"] = tuple(args.pusher_app) if args.pusher_app else None
        return ConfigSource(given, args.config)

    def options(self) -> dict[str, Any]:
        """Config's keyword arguments: flags over environment over file (ConfigError)."""
        options = {} if self.path is None else read_config_file(self.path, FILE_OPTIONS)
        for pair in _ONE_OF:
            if any(self.given[key] is not None for key in pair):
                for key in pair:
                    options.pop(key, None)
        options.update({key: value for key, value in self.given.items() if value is not None})
        options["jwt_secret"] = _jwt_secret(options.get("jwt_secret"),
                                            options.pop("jwt_secret_file", None))
        return options

    def load(self) -> Config:
        """The Config `run` starts with, or reloads (ConfigError if it would not run)."""
        config = Config(**{key: value for key, value in self.options().items()
                           if value is not None})
        config.require_auth_choice()
        return config


def main(argv: Sequence[str] | None = None) -> int:
    args, unknown = build_parser().parse_known_args(argv)
    parser: argparse.ArgumentParser = args.parser  # the command's, for its usage line
    if unknown:  # said by the command, with its usage, not by `fastfan`'s
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "token":
        return _token(parser, args)
    if args.command == "publish":
        return _publish(parser, args)
    if args.command in ("reload", "restart"):
        return _signal_master(args.pid_file, args.signal)
    try:
        if args.command == "config" and args.action == "check":
            ConfigSource(_environment(parser), args.file).load()
            print(f"{args.file}: ok")
            return 0
        source = ConfigSource.of(args)
        config = source.load()
        if args.command == "config":
            print(show_config(config), end="")
            return 0
        from .master import serve

        return serve(config, source.load)  # ConfigError only before the first fork
    except ConfigError as exc:
        parser.error(str(exc))


# A URL's password, a secret too: redis://user:***@host.
_URL_PASSWORD = re.compile(r"//([^:/@]*):[^@/]*@")


def show_config(config: Config) -> str:
    """The configuration as TOML a --config file could hold, secrets as ***."""
    lines = ["# fastfan's effective configuration (flags, FASTFAN_*, --config file, defaults)"]
    for field in fields(Config):
        value = getattr(config, field.name)
        if field.name == "namespaces":
            continue  # tables: after every top-level key, as TOML wants them
        if value is None:
            lines.append(f"# {field.name} is unset")
        elif field.name in SECRETS:
            lines.append(f'{field.name} = "***"')
        elif field.name == "pusher_app":
            apps = [app.rsplit(":", 1)[0] + ":***" for app in value]
            lines.append(f"{field.name} = {json.dumps(apps)}")
        elif field.name == "redis":
            masked = _URL_PASSWORD.sub(r"//\1:***@", value)
            lines.append(f"{field.name} = {json.dumps(masked)}")
        elif isinstance(value, bool):
            lines.append(f"{field.name} = {'true' if value else 'false'}")
        else:
            lines.append(f"{field.name} = {json.dumps(value)}")
    lines += ["", *(namespace.toml() + "\n" for namespace in config.namespaces)]
    return "\n".join(lines).rstrip("\n") + "\n"


def _signal_master(pid_file: str, signo: int) -> int:
    """`fastfan reload` and `restart`: the signal to the master whose pid `pid_file` holds."""
    name = signal.Signals(signo).name
    try:
        with open(pid_file) as file:
            pid = int(file.read().strip())
        os.kill(pid, signo)
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not a pid"
        print(f"fastfan: cannot send {name} to the master of {pid_file}: {reason}",
              file=sys.stderr)
        return 1
    print(f"sent {name} to fastfan (pid {pid}); its log says what it did")
    return 0


def _token(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from .auth import mint_token

    try:
        secret = _jwt_secret(args.jwt_secret, args.jwt_secret_file)
        if secret is None:
            raise ConfigError("token needs the server's secret: FASTFAN_JWT_SECRET, "
                              "--jwt-secret-file or --jwt-secret")
        check_jwt_secret(secret)
    except ConfigError as exc:
        parser.error(str(exc))
    if not args.sub:
        parser.error("--sub is empty: the server refuses a token without a user")
    print(mint_token(secret, args.sub, subscribe=args.subscribe,
                     publish=args.publish, ttl=args.ttl, info=args.info))
    return 0


def _publish(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    import json

    from .api_client import ApiCallError, call

    if args.api_key_file is not None:
        try:
            with open(args.api_key_file) as file:
                args.api_key = file.read().strip()
        except OSError as exc:
            parser.error(f"--api-key-file {args.api_key_file}: {exc.strerror}")
    if not args.api_key:
        parser.error("publish needs --api-key, --api-key-file or FASTFAN_API_KEY, the "
                     "server's API key")
    if urlsplit(args.api).scheme not in ("http", "https"):
        parser.error(f"--api {args.api} needs its scheme: http://{args.api} (or https://)")
    try:
        json.loads(args.data)
    except ValueError as exc:
        parser.error(f"{args.data!r} is not JSON ({exc}): to send a string, quote it "
                     f"for the shell and for JSON, e.g. '\"{args.data}\"'")
    body = b'{"channel":' + json.dumps(args.channel).encode() + b',"data":' \
        + args.data.encode() + b"}"
    try:
        result = call(args.api, args.api_key, "publish", body)
    except ApiCallError as exc:
        print(f"fastfan publish: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
