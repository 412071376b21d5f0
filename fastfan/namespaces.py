"""Namespaces: channel families with options of their own (`[[namespace]]` in --config).

A namespace names channel patterns and overrides any of the global options for the
channels it takes: the first namespace whose patterns match a channel takes it; a channel
no namespace takes keeps the global options (the default namespace). An option a namespace
does not set is the global one, as that channel would have it without namespaces.

What it costs: nothing without namespaces (the Hub's `namespaces` is None and its
presence and history patterns are the global ChannelPatterns, as before). With them, a
channel's rules are resolved once and kept (`NamespaceTable.of`: a dict lookup after the
first time), and the per-delivery loop never looks at them: they decide subscribes,
publishes, what history keeps and what presence counts.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

from .auth import ChannelPatterns
from .presence import Presence

log = logging.getLogger("fastfan.namespaces")

PUBLISH_RULES = ("token", "subscribers", "none")
# Channels whose rules are kept at most: past it the table starts again (channel names
# come from clients; a flood of names must not grow a worker).
KNOWN_CHANNELS = 65536


@dataclass(frozen=True)
class Namespace:
    """One `[[namespace]]` table: None for an option it leaves to the global one."""

    channels: tuple[str, ...]
    history_size: int | None = None
    history_ttl: float | None = None
    recover: bool = True  # a subscribe may resume from a position (with history)
    presence: bool | None = None
    join_leave: bool = True  # a subscribe may ask for join and leave events
    cache: bool = False  # a subscriber gets the latest message at once ("cached":true)
    publish: str = "token"  # PUBLISH_RULES
    max_subscribers: int = 0  # across the deployment; 0: no bound
    hooks: bool = True  # the App's can_subscribe / can_publish apply
    proxy_subscribe: bool = True
    proxy_publish: bool = True

    def check(self) -> str | None:
        """What is wrong with its values, or None."""
        if not self.channels or not all(isinstance(c, str) and c for c in self.channels):
            return 'channels: expected ["pattern", ...], a list of channel patterns'
        if self.history_size is not None and self.history_size < 0:
            return "history_size: must be 0 (no history) or more"
        if self.history_ttl is not None and self.history_ttl <= 0:
            return "history_ttl: must be a positive number of seconds"
        if self.publish not in PUBLISH_RULES:
            return f"publish: expected one of {', '.join(PUBLISH_RULES)}, got {self.publish!r}"
        if self.max_subscribers < 0:
            return "max_subscribers: must be 0 (no bound) or more"
        return None

    def toml(self) -> str:
        """The table as a --config file would hold it (`fastfan config show`)."""
        lines = ["[[namespace]]"]
        for field in fields(self):
            value = getattr(self, field.name)
            if value is None or (field.name != "channels" and value == field.default):
                continue
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, str):
                text = f'"{value}"'
            elif isinstance(value, tuple):
                text = "[" + ", ".join(f'"{item}"' for item in value) + "]"
            else:
                text = f"{value:g}" if isinstance(value, float) else str(value)
            lines.append(f"{field.name} = {text}")
        return "\n".join(lines)


# What each key of a [[namespace]] table takes: its TOML type(s).
NAMESPACE_KEYS: dict[str, tuple[type, ...]] = {
    "channels": (list,), "history_size": (int,), "history_ttl": (int, float),
    "recover": (bool,), "presence": (bool,), "join_leave": (bool,), "cache": (bool,),
    "publish": (str,), "max_subscribers": (int,), "hooks": (bool,),
    "proxy_subscribe": (bool,), "proxy_publish": (bool,)}


def namespace_from_table(table: dict[str, Any]) -> Namespace:
    """A [[namespace]] table's Namespace; ValueError naming the key and what it takes."""
    for key, value in table.items():
        kinds = NAMESPACE_KEYS.get(key)
        if kinds is None:
            raise ValueError(f"{key}: unknown key (a namespace takes "
                             f"{', '.join(NAMESPACE_KEYS)})")
        if isinstance(value, bool) != (bool in kinds) or not isinstance(value, kinds):
            expected = {bool: "true or false", int: "a whole number", str: "a string",
                        list: 'a list of channel patterns'}[kinds[0]]
            if float in kinds:
                expected = "a number of seconds"
            raise ValueError(f"{key}: expected {expected}")
    if "channels" not in table:
        raise ValueError('channels: expected channels = ["pattern", ...], a list of '
                         'channel patterns')
    options = dict(table, channels=tuple(table["channels"]))
    if "history_ttl" in options:
        options["history_ttl"] = float(options["history_ttl"])
    namespace = Namespace(**options)
    problem = namespace.check()
    if problem is not None:
        raise ValueError(problem)
    return namespace


@dataclass(frozen=True, slots=True)
class ChannelRules:
    """What a namespace decides for one of its channels (the Hub's view of it)."""

    presence: bool  # counted in presence: `presence` true, or a subscriber bound
    presence_asked: bool  # the `presence` requests are answered
    history_size: int  # messages kept; 0: none (a cache keeps at least one)
    history_ttl: float
    recover: bool
    join_leave: bool
    cache: bool
    publish: str
    max_subscribers: int
    ask_subscribe: bool  # the App's can_subscribe or the subscribe proxy decides
    ask_publish: bool


@dataclass(frozen=True)
class Defaults:
    """The global options the namespaces fall back on (config.Config's)."""

    presence: ChannelPatterns
    history: ChannelPatterns  # the channels with history (those of Pusher's cache too)
    history_size: int
    history_ttl: float
    proxy_subscribe: bool  # a subscribe proxy decides subscribes (not the App)
    proxy_publish: bool


class NamespaceTable:
    """A worker's namespaces, resolved per channel once; one object for the worker's life
    (the history stores and the Hub hold it), its namespaces replaced by a reload."""

    def __init__(self, namespaces: Sequence[Namespace], defaults: Defaults, hub: Any) -> None:
        self.hub = hub  # fastfan._core.Hub: its bus counts subscribers (admit)
        # channel -> the subscribes waiting for its subscribers' count: (session, request
        # id, join_leave, recover) each
        self._admitting: dict[str, list[tuple[Any, bytes, bool, Any]]] = {}
        self.apply(namespaces, defaults)

    def apply(self, namespaces: Sequence[Namespace], defaults: Defaults) -> None:
        self.namespaces = tuple(namespaces)
        self.defaults = defaults
        self.active = bool(namespaces)  # attribute, not a call: checked per history publish
        self._patterns = [ChannelPatterns(n.channels) for n in self.namespaces]
        self._known: dict[str, ChannelRules | None] = {}
        self.presence = _Allows(lambda rules: rules.presence, defaults.presence, self)
        self.presence_asked = _Allows(lambda rules: rules.presence_asked, defaults.presence,
                                      self)
        self.history = _Allows(lambda rules: rules.history_size > 0, defaults.history, self)

    def of(self, channel: str) -> ChannelRules | None:
        """The rules of `channel`'s namespace, or None: no namespace takes it."""
        try:
            return self._known[channel]
        except KeyError:
            pass
        if len(self._known) >= KNOWN_CHANNELS:
            self._known.clear()
        rules = self._known[channel] = self._resolve(channel)
        return rules

    def _resolve(self, channel: str) -> ChannelRules | None:
        for namespace, patterns in zip(self.namespaces, self._patterns, strict=True):
            if patterns.allows(channel):
                return self._rules(namespace, channel)
        return None

    def _rules(self, namespace: Namespace, channel: str) -> ChannelRules:
        defaults = self.defaults
        size = namespace.history_size
        if size is None:
            size = defaults.history_size if defaults.history.allows(channel) else 0
        if namespace.cache:
            size = max(size, 1)
        presence = defaults.presence.allows(channel) if namespace.presence is None \
            else namespace.presence
        return ChannelRules(
            presence=presence or namespace.max_subscribers > 0, presence_asked=presence,
            history_size=size,
            history_ttl=defaults.history_ttl if namespace.history_ttl is None
            else namespace.history_ttl,
            recover=namespace.recover, join_leave=namespace.join_leave, cache=namespace.cache,
            publish=namespace.publish, max_subscribers=namespace.max_subscribers,
            ask_subscribe=namespace.proxy_subscribe if defaults.proxy_subscribe
            else namespace.hooks,
            ask_publish=namespace.proxy_publish if defaults.proxy_publish
            else namespace.hooks)

    def caches(self, channel: str) -> bool:
        """Whether `channel`'s subscribers get its latest message at once."""
        rules = self.of(channel)
        return rules is not None and rules.cache

    def admit(self, session: Any, channel: str, bound: int, request_id: bytes,
              join_leave: bool, recover: Any) -> None:
        """A subscribe to a channel whose namespace bounds its subscribers: let in
        (session.subscribe_admitted) while the deployment counts fewer than `bound`, else
        refused with 429. One count per channel at a time (presence's gather, every worker
        and node): the subscribes that come meanwhile wait for it and are counted one by
        one as they are let in, so one worker never lets in more than the bound."""
        entry = (session, request_id, join_leave, recover)
        waiting = self._admitting.get(channel)
        if waiting is not None:
            waiting.append(entry)
            return
        self._admitting[channel] = [entry]
        self.hub.bus.gather_presence(channel, functools.partial(self._counted, channel))

    def _counted(self, channel: str, presence: Presence | None) -> None:
        rules = self.of(channel)
        bound = 0 if rules is None else rules.max_subscribers  # a reload may change it
        count = None if presence is None else presence[0]
        for session, request_id, join_leave, recover in self._admitting.pop(channel, []):
            if count is None:
                session.refuse(503, f"the subscribers of {channel} cannot be counted now "
                               "(the bus did not answer); try again", request_id)
            elif bound and count >= bound:
                session.refuse(429, f"{channel} is full: {bound} subscribers (its "
                               "namespace's max_subscribers)", request_id)
            else:
                count += 1
                session.subscribe_admitted(channel, request_id, join_leave, recover)

    def history_limits(self, channel: str) -> tuple[int, float]:
        """What a history store keeps of `channel`: (messages, seconds)."""
        rules = self.of(channel)
        if rules is None:
            return self.defaults.history_size, self.defaults.history_ttl
        return rules.history_size, rules.history_ttl


class _Allows:
    """A ChannelPatterns for the Hub and the buses (`allows`): the namespace's rule for
    its channels, the global patterns for the others."""

    __slots__ = ("_default", "_rule", "_table")

    def __init__(self, rule: Callable[[ChannelRules], bool], default: ChannelPatterns,
                 table: NamespaceTable) -> None:
        self._rule = rule
        self._default = default
        self._table = table

    def allows(self, channel: str) -> bool:
        rules = self._table.of(channel)
        return self._default.allows(channel) if rules is None else self._rule(rules)


def history_capacity(history_size: int, namespaces: Sequence[Namespace]) -> int:
    """The most messages any channel keeps: what the history stores are sized for at
    start (a reload may not pass it)."""
    sizes = [history_size] + [max(n.history_size or 0, 1 if n.cache else 0)
                              for n in namespaces]
    return max(sizes)


def describe_changes(old: Sequence[Namespace], new: Sequence[Namespace]) -> list[str]:
    """The namespaces a reload changes, as the log says them."""
    changes = []
    for index in range(max(len(old), len(new))):
        before = old[index] if index < len(old) else None
        after = new[index] if index < len(new) else None
        if before == after:
            continue
        if after is None:
            assert before is not None
            changes.append(f"namespace {list(before.channels)} removed")
        elif before is None:
            changes.append(f"namespace {list(after.channels)} added")
        else:
            diff = [f"{field.name} {getattr(before, field.name)!r} -> "
                    f"{getattr(after, field.name)!r}" for field in fields(Namespace)
                    if getattr(before, field.name) != getattr(after, field.name)]
            changes.append(f"namespace {list(after.channels)}: {', '.join(diff)}")
    return changes
