"""`--config FILE`: a TOML file of `run`'s options, read with the standard library's tomllib.

Its top-level keys are the long option names with `_` for `-` (`max_buffer = 1048576`),
each value checked by the same parser as the flag's, so a bad value is refused with the
key, its line and the reason. `[[namespace]]` tables become the `namespaces` option
(fastfan.namespaces), each key checked there, an error naming the table's line.

tomllib keeps no positions, so the lines come from a scan of the text: the first line
that sets a top-level key (before any table header), and each `[[namespace]]` header.
"""

from __future__ import annotations

import argparse
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .config import ConfigError
from .namespaces import namespace_from_table

# Options whose flag takes comma-separated items: in the file, a string or a list of them.
LIST_OPTIONS = frozenset({"redis", "presence_channels", "history_channels"})
NAMESPACE = "namespace"


@dataclass(frozen=True)
class FileOption:
    """What a key of the file takes: a TOML type, then the flag's own parser on its text."""

    parse: Callable[[str], Any]
    choices: Sequence[str] | None
    kind: type  # bool, int, float (an int is taken too) or str
    words: Sequence[str] = ()  # strings an int option takes as well (workers = "auto")


def read_config_file(path: str, options: Mapping[str, FileOption]) -> dict[str, Any]:
    """The file's options by key (the Config field names, and *_file keys), or ConfigError
    naming the file, the key and its line."""
    try:
        with open(path, "rb") as file:
            raw = file.read()
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc.strerror}") from None
    try:
        text = raw.decode()
        document = tomllib.loads(text)
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text (TOML is UTF-8)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    lines = _key_lines(text)
    values: dict[str, Any] = {}
    for key, value in document.items():
        where = f"{path}:{lines.get(key, '?')}: {key}"
        if key == NAMESPACE:
            values["namespaces"] = _namespaces(path, value, lines)
            continue
        option = options.get(key)
        if option is None:
            raise ConfigError(f"{where}: unknown key (the keys are run's long options with "
                              f"'_' for '-', e.g. max_buffer; see fastfan run --help)")
        values[key] = _value(where, key, value, option)
    return values


def _value(where: str, key: str, value: Any, option: FileOption) -> Any:
    """`value` as the flag would have it, or ConfigError saying what the key takes."""
    if key in LIST_OPTIONS and isinstance(value, list) \
            and all(isinstance(item, str) for item in value):
        value = ",".join(value)
    if option.kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {_toml(value)}")
        return value
    allowed: tuple[type, ...] = (int, float) if option.kind is float else (option.kind,)
    if isinstance(value, bool) or not (isinstance(value, allowed) or value in option.words):
        expected = {int: "a whole number", float: "a number", str: "a string"}[option.kind]
        if option.words:
            expected += " or " + " or ".join(f'"{word}"' for word in option.words)
        if key in LIST_OPTIONS:
            expected += " or a list of strings"
        raise ConfigError(f"{where}: expected {expected}, got {_toml(value)}")
    try:
        parsed = option.parse(str(value))
    except argparse.ArgumentTypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if option.choices is not None and parsed not in option.choices:
        raise ConfigError(f"{where}: expected one of {', '.join(option.choices)}, "
                          f"got {_toml(value)}")
    return parsed


def _toml(value: Any) -> str:
    """A value as the file spells it, for an error message."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return str(value)


def _namespaces(path: str, tables: Any, lines: dict[str, int]) -> tuple[Any, ...]:
    """`[[namespace]]` tables as fastfan.namespaces.Namespace, in order; ConfigError naming
    the table's line and the key."""
    first = lines.get(NAMESPACE, "?")
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"{path}:{first}: namespace: expected [[namespace]] tables")
    namespaces = []
    for number, table in enumerate(tables):
        line = lines.get(f"{NAMESPACE}#{number}", first)
        try:
            namespaces.append(namespace_from_table(table))
        except ValueError as exc:
            raise ConfigError(f"{path}:{line}: namespace.{exc}") from None
    return tuple(namespaces)


_HEADER = re.compile(r"\s*(\[\[?)\s*([^\]]*?)\s*\]")
_KEY = re.compile(r"""\s*(?:"([^"]*)"|'([^']*)'|([A-Za-z0-9_-]+))\s*[=.]""")


def _key_lines(text: str) -> dict[str, int]:
    """Line numbers (from 1) of the top-level keys and table headers, and of each
    `[[namespace]]` header as `namespace#N`."""
    lines: dict[str, int] = {}
    top_level = True
    namespaces = 0
    for number, line in enumerate(text.splitlines(), 1):
        header = _HEADER.match(line)
        if header is not None:
            top_level = False
            name = header[2].strip("\"'")
            lines.setdefault(name, number)
            if header[1] == "[[" and name == NAMESPACE:
                lines[f"{NAMESPACE}#{namespaces}"] = number
                namespaces += 1
            continue
        key = _KEY.match(line) if top_level else None
        if key is not None:
            lines.setdefault(next(group for group in key.groups() if group is not None), number)
    return lines
