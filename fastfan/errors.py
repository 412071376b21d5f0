"""What a client or a backend is told when a request is refused, said once for the
WebSocket (`{"type":"error","code":N,"message":M}`) and the server API (HTTP N,
`{"error":{"code":N,"message":M}}`) alike: each a (code, message) pair."""

from __future__ import annotations

Refusal = tuple[int, str]

CHANNEL_RULE = "1-255 characters from A-Z a-z 0-9 _ - . : @ /"
BUS_UNAVAILABLE: Refusal = (503, "message bus unavailable, try again")
PRESENCE_UNAVAILABLE: Refusal = (
    503, "presence unavailable: a worker or Redis did not answer, try again")
HISTORY_UNAVAILABLE: Refusal = (503, "history unavailable: its store did not answer, try again")
NEGATIVE_POSITION: Refusal = (400, "'limit' and 'since' must be 0 or more")


def invalid_channel(channel: str | None = None) -> Refusal:
    """A channel name outside the rule (quoted, when given: the API's caller sent JSON)."""
    named = "" if channel is None else f" {channel[:300]!r}"
    return 400, f"invalid channel name{named}: {CHANNEL_RULE}"


def no_presence(channel: str) -> Refusal:
    return 400, f"no presence is kept for {channel} (--presence-channels)"


def epoch_changed(channel: str, epoch: str) -> Refusal:
    return 409, f"epoch changed: {channel} is at epoch {epoch} now, its history from before is gone"
