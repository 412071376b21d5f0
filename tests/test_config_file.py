"""`--config FILE`: its keys, its precedence under the environment and the flags, its
errors (the key and its line), `fastfan config check` and `fastfan config show`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from support.cli import assert_usage_error, fastfan
from support.server import SECRET

SHOWN = {"port", "max_buffer", "publish_rate", "subscribe_rate", "history_channels",
         "compression", "jwt_secret", "api_key", "redis"}


def shown(output: str) -> dict[str, str]:
    """`config show`'s lines, key -> the value as written, for the keys a test looks at."""
    values = {}
    for line in output.splitlines():
        key, _, value = line.partition(" = ")
        if key in SHOWN:
            values[key] = value
    return values


def write(tmp_path: Path, text: str, name: str = "fastfan.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_flags_win_over_the_environment_which_wins_over_the_file(tmp_path: Path) -> None:
    secret_file = write(tmp_path, SECRET + "\n", "secret")
    config = write(tmp_path, f"""
port = 1111
max_buffer = 2222
publish_rate = 3333
history_channels = ["chat.*", "news"]
compression = false
jwt_secret_file = "{secret_file}"
redis = "redis://app:hunter2-0123@127.0.0.1:6379/0"
""")
    result = fastfan("config", "show", "--publish-rate", "6666",
                     env={"FASTFAN_CONFIG": str(config), "FASTFAN_MAX_BUFFER": "4444",
                          "FASTFAN_PUBLISH_RATE": "5555"})
    assert result.returncode == 0, result.stderr
    assert shown(result.stdout) == {
        "port": "1111",  # the file
        "max_buffer": "4444",  # the environment over the file
        "publish_rate": "6666",  # the flag over both
        "subscribe_rate": "20",  # the default
        "history_channels": '"chat.*,news"',  # a list in the file, the flag's commas here
        "compression": "false",
        "jwt_secret": '"***"',  # read from the file's jwt_secret_file, never shown
        "redis": '"redis://app:***@127.0.0.1:6379/0"',
    }
    assert SECRET not in result.stdout and "hunter2" not in result.stdout
    assert "# api_key is unset" in result.stdout


def test_the_environment_gives_a_secret_the_file_gives_as_a_file(tmp_path: Path) -> None:
    """A secret given two ways (the value, or a file of it) is one option: the layer on top
    decides, rather than both being refused together."""
    config = write(tmp_path, 'jwt_secret_file = "/nonexistent/secret"\n')
    result = fastfan("config", "show", "--config", str(config),
                     env={"FASTFAN_JWT_SECRET": SECRET})
    assert result.returncode == 0, result.stderr
    assert shown(result.stdout)["jwt_secret"] == '"***"'


def test_show_masks_the_webhook_secret_and_each_pusher_apps_secret(tmp_path: Path) -> None:
    secret_file = write(tmp_path, "webhook-secret-0123456789\n", "webhook-secret")
    result = fastfan("config", "show", "--webhook-url", "http://127.0.0.1:9/hooks",
                     "--webhook-secret-file", str(secret_file),
                     "--pusher-app", "7:app-key:pusher-secret-0123", "--insecure")
    assert result.returncode == 0, result.stderr
    assert "webhook-secret-0123456789" not in result.stdout
    assert "pusher-secret-0123" not in result.stdout
    assert 'webhook_secret = "***"' in result.stdout
    assert 'pusher_app = ["7:app-key:***"]' in result.stdout


def test_run_takes_its_options_from_the_file(tmp_path: Path, start_server: Any) -> None:
    config = write(tmp_path, f'jwt_secret = "{SECRET}"\nmax_subscriptions = 1\n')
    server = start_server("--config", str(config), secret=None)
    client = server.connect().subscribe("first")
    client.send_json({"type": "subscribe", "channel": "second"})
    assert client.recv_json()["code"] == 429  # the file's bound of one subscription


BAD_FILES = [
    ("port = 8080\n\nmax_bufer = 5\n", ["fastfan.toml:3", "max_bufer", "unknown key"]),
    ("port = 8080\nmax_buffer = \"big\"\n", ["fastfan.toml:2", "max_buffer",
                                             "a whole number", '"big"']),
    ("max_buffer = 1.5\n", ["fastfan.toml:1", "max_buffer", "a whole number", "1.5"]),
    ("compression = \"off\"\n", ["fastfan.toml:1", "compression", "true or false"]),
    ("insecure = 1\n", ["fastfan.toml:1", "insecure", "true or false"]),
    ("workers = \"many\"\n", ["fastfan.toml:1", "workers", '"auto"', '"many"']),
    ("\nport = 70000\n", ["fastfan.toml:2", "port", "65535"]),
    ("shutdown_grace = 0\n", ["fastfan.toml:1", "shutdown_grace", "positive"]),
    ("slow_consumer = \"explode\"\n", ["fastfan.toml:1", "slow_consumer", "disconnect"]),
    ("history_channels = [1, 2]\n", ["fastfan.toml:1", "history_channels", "list of strings"]),
    ("port = 8080\n[limits]\nmax_buffer = 5\n", ["fastfan.toml:2", "limits", "unknown key"]),
    ("port = \n", ["fastfan.toml", "not valid TOML", "line 1"]),
    ("[[namespace]]\nchannels = [\"a\"]\n[[namespace]]\nhistory_size = 5\n",
     ["fastfan.toml:3", "namespace.channels"]),
    ("port = 1\n\n[[namespace]]\nchannels = [\"a.*\"]\nhistroy_size = 5\n",
     ["fastfan.toml:3", "namespace.histroy_size", "unknown key"]),
    ("[[namespace]]\nchannels = [\"a.*\"]\ncache = \"yes\"\n",
     ["fastfan.toml:1", "namespace.cache", "true or false"]),
    ("[[namespace]]\nchannels = [\"a.*\"]\nhistory_size = true\n",
     ["fastfan.toml:1", "namespace.history_size", "a whole number"]),
    ("[[namespace]]\nchannels = [\"a.*\"]\nhistory_ttl = 0\n",
     ["fastfan.toml:1", "namespace.history_ttl", "positive"]),
    ("[[namespace]]\nchannels = [\"a.*\"]\npublish = \"anyone\"\n",
     ["fastfan.toml:1", "namespace.publish", "token, subscribers, none"]),
    ("[[namespace]]\nchannels = [\"a.*\"]\nmax_subscribers = -1\n",
     ["fastfan.toml:1", "namespace.max_subscribers"]),
    ("[[namespace]]\nchannels = []\n", ["fastfan.toml:1", "namespace.channels"]),
    ("[[namespace]]\nchannels = \"a.*\"\n", ["fastfan.toml:1", "namespace.channels",
                                              "a list of channel patterns"]),
    ("namespace = 5\n", ["fastfan.toml:1", "namespace", "[[namespace]] tables"]),
]


@pytest.mark.parametrize("text, words", BAD_FILES, ids=[t for t, _ in BAD_FILES])
def test_a_bad_file_is_refused_naming_the_key_and_its_line(tmp_path: Path, text: str,
                                                           words: list[str]) -> None:
    config = write(tmp_path, text)
    assert_usage_error(fastfan("config", "check", str(config)), *words)


def test_run_refuses_a_bad_file_before_it_starts(tmp_path: Path) -> None:
    config = write(tmp_path, "port = 8080\npublish_rat = 5\n")
    assert_usage_error(fastfan("run", "--insecure", "--config", str(config)),
                       "fastfan.toml:2", "publish_rat")
    assert_usage_error(fastfan("run", "--insecure", "--config", str(tmp_path / "absent.toml")),
                       "cannot read the config file", "absent.toml")


def test_config_check_accepts_a_good_file(tmp_path: Path) -> None:
    config = write(tmp_path, f'# comments are fine\njwt_secret = "{SECRET}"\nworkers = "auto"\n'
                             f'presence_channels = "room.*"\ndrain_delay = 0\n')
    result = fastfan("config", "check", str(config))
    assert (result.returncode, result.stdout) == (0, f"{config}: ok\n")


def test_config_check_refuses_a_file_run_would_refuse(tmp_path: Path) -> None:
    """Keys and types fine, but no token key: `run` would not start with it."""
    config = write(tmp_path, "port = 8080\n")
    assert_usage_error(fastfan("config", "check", str(config)), "no token key")


def test_the_deploy_examples_check(tmp_path: Path) -> None:
    """deploy/fastfan.toml and the Kubernetes ConfigMap's file, with the secret from the
    environment (which replaces their jwt_secret_file, as compose.yaml does)."""
    deploy = Path(__file__).parent.parent / "deploy"
    manifest = (deploy / "kubernetes" / "fastfan.yaml").read_text().splitlines()
    start = manifest.index("  fastfan.toml: |") + 1
    embedded = []
    for line in manifest[start:]:
        if line and not line.startswith("    "):
            break
        embedded.append(line[4:])
    for config in (deploy / "fastfan.toml", write(tmp_path, "\n".join(embedded))):
        result = fastfan("config", "check", str(config), env={"FASTFAN_JWT_SECRET": SECRET})
        assert result.returncode == 0, result.stderr
