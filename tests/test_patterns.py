"""Channel patterns of a token's claims: `*` matches any run of characters, in linear time."""

from __future__ import annotations

import fnmatch
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastfan.auth import ChannelPatterns

CASES = [
    # (patterns, channel, allowed)
    (["*"], "", True),
    (["*"], "anything.at:all", True),
    (["**"], "x", True),
    (["chat"], "chat", True),
    (["chat"], "chat.x", False),
    (["chat"], "cha", False),
    ([""], "", True),
    ([""], "a", False),
    (["chat.*"], "chat.", True),
    (["chat.*"], "chat.room", True),
    (["chat.*"], "chat", False),
    (["chat.*"], "news.chat.room", False),
    (["*.log"], ".log", True),
    (["*.log"], "app.log", True),
    (["*.log"], "app.logs", False),
    (["a*b*c"], "abc", True),
    (["a*b*c"], "aXbYc", True),
    (["a*b*c"], "abbc", True),
    (["a*b*c"], "acb", False),
    (["a*b*c"], "ab", False),
    (["a*b*c"], "abcab", False),
    (["a**b"], "ab", True),
    (["a**b"], "a.b", True),
    (["ab*ab"], "ab", False),  # prefix and suffix may not overlap
    (["ab*ab"], "aba", False),
    (["ab*ab"], "abab", True),
    (["a*aa*a"], "aaaa", True),
    (["a*aa*a"], "aaa", False),
    (["*x*"], "x", True),
    (["*x*"], "abc", False),
    (["user.*.inbox", "news"], "user.alice.inbox", True),
    (["user.*.inbox", "news"], "news", True),
    (["user.*.inbox", "news"], "user.alice.outbox", False),
    ([], "anything", False),
    ([], "", False),
]


@pytest.mark.parametrize("patterns, channel, allowed", CASES)
def test_cases(patterns: list[str], channel: str, allowed: bool) -> None:
    assert ChannelPatterns(patterns).allows(channel) is allowed


def test_allows_all_only_for_a_bare_wildcard() -> None:
    assert ChannelPatterns(["*"]).allows_all
    assert ChannelPatterns(["news", "***"]).allows_all
    assert not ChannelPatterns(["*.*"]).allows_all
    assert not ChannelPatterns([""]).allows_all
    assert not ChannelPatterns([]).allows_all


# Channel characters, without fnmatch's own specials ('?', '[', ']'), so that fnmatch's
# `*` and ours mean the same thing.
CHANNEL_TEXT = st.text(alphabet="ab.:-_", max_size=12)
PATTERN_TEXT = st.text(alphabet="ab.*", max_size=8)


@given(st.lists(PATTERN_TEXT, max_size=3), CHANNEL_TEXT)
def test_agrees_with_fnmatch(patterns: list[str], channel: str) -> None:
    expected = any(fnmatch.fnmatchcase(channel, p) for p in patterns)
    assert ChannelPatterns(patterns).allows(channel) is expected


@pytest.mark.parametrize("pattern", ["*.*.*.*.x", "*.*.*.*.x*"])
def test_adversarial_patterns_take_linear_time(pattern: str) -> None:
    """As a backtracking regex, ONE of these checks took seconds; 1000 must be quick."""
    patterns, channel = ChannelPatterns([pattern]), "." * 254
    started = time.perf_counter()
    for _ in range(1000):
        assert not patterns.allows(channel)
        assert time.perf_counter() - started < 1.0  # ~3 ms in all here; loose for a busy box
