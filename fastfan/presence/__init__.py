"""Presence: who is subscribed to a channel, across the workers and nodes.

Each worker lists its own subscribers (the Hub's subscriber arrays, `Hub.presence_part`);
the embedded bus asks every worker for its part and merges them (`merge_presence`);
through Redis every worker writes its subscribers to a hash per channel (presence/redis.py)
that a request reads in one script.
"""

from __future__ import annotations

# A presence entry: [clientId, user, info] (info the token's `info` claim as JSON text, or "").
Entries = list[list[str]]
# A channel's subscribers (on one worker, or everywhere): how many, their distinct users'
# keys (fastfan._core.user_key), and at most --presence-limit of their entries.
Presence = tuple[int, list[str], Entries]


def merge_presence(parts: list[Presence], limit: int) -> Presence:
    """Several workers' parts as one, its entries cut at `limit`."""
    users: set[str] = set()
    clients: Entries = []
    for _, keys, entries in parts:
        users.update(keys)
        clients += entries[:limit - len(clients)]
    return sum(part[0] for part in parts), list(users), clients

__all__ = ["Entries", "Presence", "merge_presence"]
