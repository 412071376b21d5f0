"""The embedded bus's history store as a unit: numbering, trimming by size and by time,
reads, and what a sweep forgets."""

from __future__ import annotations

import json
import time

import pytest

from fastfan import history
from fastfan.history import HistoryStore, owner_of, with_position


def message(n: int) -> bytes:
    return b'{"type":"message","channel":"c","data":%d}' % n


def test_numbering_appends_the_position_and_keeps_the_json_valid() -> None:
    store = HistoryStore(size=3, ttl=60)
    results = [store.sequence("c", message(n)) for n in range(5)]
    assert [offset for offset, _, _ in results] == [1, 2, 3, 4, 5]
    assert len({epoch for _, epoch, _ in results}) == 1
    decoded = json.loads(results[-1][2])
    assert decoded == {"type": "message", "channel": "c", "data": 4, "offset": 5,
                       "epoch": results[0][1]}
    assert with_position(b'{"a":1}', 7, "e") == b'{"a":1,"offset":7,"epoch":"e"}'
    # Kept: the last three; the last `limit`, or the first `limit` after `since`.
    top, epoch, kept = store.read("c", -1, 10)
    assert (top, epoch) == (5, results[0][1])
    assert [offset for offset, _ in kept] == [3, 4, 5]
    assert [offset for offset, _ in store.read("c", -1, 2).messages] == [4, 5]
    assert [offset for offset, _ in store.read("c", 3, 10).messages] == [4, 5]
    assert store.read("c", 5, 10).messages == []
    assert store.read("c", -1, 0).messages == []
    assert store.kept_bytes == sum(len(m) for _, m in kept) + history.CHANNEL_COST
    # Channels are numbered apart, each in its own epoch.
    assert store.sequence("d", message(0))[0] == 1
    assert store.read("d", -1, 1).epoch != epoch


def test_expiry_keeps_the_offsets_and_the_sweep_forgets_idle_channels(
        monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    store = HistoryStore(size=10, ttl=5)
    store.sequence("c", message(1))
    store.sequence("c", message(2))
    epoch = store.read("c", -1, 10).epoch
    now[0] += 6
    assert store.read("c", -1, 10) == (2, epoch, [])  # expired, offsets kept
    assert store.kept_bytes == history.CHANNEL_COST  # the channel itself, no message
    assert store.sequence("c", message(3))[:2] == (3, epoch)
    now[0] += 6
    store.sweep()
    assert "c" in store.channels  # its position is kept for META_TTL
    now[0] += history.META_TTL
    store.sweep()
    assert "c" not in store.channels
    assert store.read("c", -1, 10).epoch != epoch  # a new run of the channel


def test_owners_spread_over_the_workers() -> None:
    owners = [owner_of(f"channel.{n}", 4) for n in range(1000)]
    assert set(owners) == {0, 1, 2, 3}
    assert min(owners.count(w) for w in range(4)) > 200
    assert owner_of("x", 1) == 0


def test_a_read_of_a_channel_without_history_creates_nothing_and_names_its_first_epoch(
        monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    store = HistoryStore(size=10, ttl=5)
    answer = store.read("new", 0, 10)
    assert (answer.top, answer.messages) == (0, [])
    assert store.channels == {} and store.kept_bytes == 0
    assert store.read("new", 0, 10).epoch == answer.epoch  # the same until it is published
    assert store.sequence("new", message(1))[1] == answer.epoch  # which starts that epoch
    assert store.read("other", 0, 10).epoch != answer.epoch
    # Another store (a restarted worker), or the same a day later, names another.
    assert HistoryStore(size=10, ttl=5).read("new2", 0, 10).epoch != store.read(
        "new2", 0, 10).epoch
    first = store.read("new2", 0, 10).epoch
    now[0] += history.META_TTL
    assert store.read("new2", 0, 10).epoch != first


def test_a_full_store_refuses_and_drops_nothing() -> None:
    store = HistoryStore(size=2, ttl=60, max_bytes=4096)
    store.sequence("a", message(0))
    kept = store.read("a", -1, 10)
    big = b'{"type":"message","channel":"b","data":"%s"}' % (b"x" * 3000)
    with pytest.raises(history.HistoryFullError, match="--history-max-bytes"):
        store.sequence("b", big + big)
    assert store.read("a", -1, 10) == kept and "b" not in store.channels
    # A channel at its --history-size makes room for its own next message.
    store.sequence("b", big)
    assert store.kept_bytes <= 4096
    store.sequence("a", message(1))
    store.sequence("a", message(2))  # offset 1 goes: a's own --history-size
    assert [offset for offset, _ in store.read("a", -1, 10).messages] == [2, 3]


def test_an_answer_is_cut_to_its_byte_bound_keeping_what_was_asked_first() -> None:
    entry = b"x" * (history.ANSWER_MAX_BYTES // 4)
    messages = [(n, 0.0, entry) for n in range(1, 11)]
    assert [offset for offset, _ in history.select(messages, 0, 10)] == [1, 2, 3, 4]
    assert [offset for offset, _ in history.select(messages, -1, 10)] == [7, 8, 9, 10]
    huge = [(1, 0.0, b"x" * (2 * history.ANSWER_MAX_BYTES))]
    assert len(history.select(huge, 0, 10)) == 1  # never none while one is there


def test_reads_beyond_those_in_flight_wait_their_turn_then_are_refused() -> None:
    limiter = history.ReadLimiter()
    started: list[int] = []
    refused: list[int] = []
    total = history.READS_IN_FLIGHT + history.READS_QUEUED + 1
    for n in range(total):
        limiter.submit(lambda n=n: started.append(n), lambda n=n: refused.append(n))
    assert started == list(range(history.READS_IN_FLIGHT)) and refused == [total - 1]
    limiter.done()
    assert started[-1] == history.READS_IN_FLIGHT  # the first waiting one goes
