"""GET /status and GET /status.json on the API port: the server's figures, live, for a person.

The page (status.html: plain JS and SVG, nothing fetched from anywhere but this port) asks
/status.json once a second and draws rates from the differences of counters between two
answers. Every worker answers from the same shared figures, so the differences hold
whichever worker the kernel hands the request to.

Who may look (`may_view`): a caller presenting the API key, as `Authorization: apikey K` or
`?key=K`; and, without a key, a caller on the loopback interface (127.0.0.0/8, ::1) whose
`Host` header names the loopback too (`names_loopback`): a page of another site that a
browser on this machine loads can reach 127.0.0.1 under that site's own name (DNS
rebinding), and its requests then carry that name. A key that is presented must be the
right one, from localhost too: a wrong key is a mistake to report, not one to hide because
the caller happens to be local.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import hmac
import ipaddress
import re
import urllib.parse
from collections.abc import Mapping
from importlib import resources
from typing import Any

from ._core import LATENCY_BOUNDS
from .metrics import FIGURES, WRITTEN_AT

# The busiest channels listed, by subscribers.
TOP_CHANNELS = 10
# The figures of a row shown on the page besides the latency histogram.
ROW_FIGURES = (*(key for key in FIGURES if not key.startswith("latency_")), WRITTEN_AT)
_BUCKETS = tuple(key for key in FIGURES if key.startswith("latency_bucket_"))


def is_loopback(host: str | None) -> bool:
    """127.0.0.0/8, ::1 and ::ffff:127.x.y.z; anything else, or no address, is not."""
    try:
        address = ipaddress.ip_address((host or "").partition("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def names_loopback(host: bytes | None) -> bool:
    """A Host header of localhost, 127.x.y.z or [::1], a port or not; no header is not."""
    if host is None:
        return False
    name = host.strip().decode("latin-1").lower()
    if name.startswith("["):  # an IPv6 address, with or without a port
        name = name[1:].partition("]")[0]
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    return name in ("localhost", "localhost.") or is_loopback(name)


def presented_key(headers: Mapping[bytes, bytes], query: bytes) -> bytes | None:
    """The key the caller gave, None when it gave none; the header wins over `?key=`.

    An Authorization header of another scheme presents an empty key: it cannot be right.
    """
    header = headers.get(b"authorization")
    if header is not None:
        scheme, _, key = header.strip().partition(b" ")
        return key.strip() if scheme.lower() == b"apikey" else b""
    values = urllib.parse.parse_qs(query.decode("latin-1"), keep_blank_values=True).get("key")
    return values[0].encode() if values else None


def may_view(peer: str | None, presented: bytes | None, key: bytes) -> bool:
    """The key rule of /status and /status.json (see the module's docstring)."""
    if presented is not None:
        return hmac.compare_digest(presented, key)
    return is_loopback(peer)


def document(rows: list[dict[str, float]], *, now: float, node: str, uptime: float,
             worker: int, redis: bool, channels: Mapping[str, int],
             channels_everywhere: bool) -> dict[str, Any]:
    """What /status.json answers: every worker's row and the master's, cumulative counters
    with when each row was written (the page divides differences of the one by differences
    of the other), and the busiest `channels`: the whole deployment's, or `worker`'s alone
    when `channels_everywhere` is false (a worker or node did not answer).

    `rows` come from SharedFigures.each(): one per worker, then the master's (the totals of
    workers that died and the restarts).
    """
    return {
        "time": now,
        "node": node,
        "uptime": uptime,
        "worker": worker,
        "redis": redis,
        "latency_bounds": list(LATENCY_BOUNDS),
        "workers": [_row(row) for row in rows[:-1]],
        "master": _row(rows[-1]),
        "channels": [{"channel": name, "subscribers": count}
                     for name, count in busiest(channels, TOP_CHANNELS)],
        "channels_everywhere": channels_everywhere,
    }


def busiest(channels: Mapping[str, int], count: int) -> list[tuple[str, int]]:
    """The `count` channels with the most subscribers, most first; ties by name."""
    top = heapq.nsmallest(count, ((-n, name) for name, n in channels.items() if n > 0))
    return [(name, -negative) for negative, name in top]


def _row(figures: Mapping[str, float]) -> dict[str, Any]:
    row: dict[str, Any] = {key: figures[key] for key in ROW_FIGURES}
    row["latency_buckets"] = [figures[key] for key in _BUCKETS]
    return row


def _content_security_policy(page: bytes) -> bytes:
    """Only this page's own inline script and style run, and it talks to this port only."""
    def hashes(tag: bytes) -> bytes:
        bodies = re.findall(rb"<%s>(.*?)</%s>" % (tag, tag), page, re.DOTALL)
        return b" ".join(b"'sha256-%s'" % base64.b64encode(hashlib.sha256(body).digest())
                         for body in bodies)
    return (b"default-src 'none'; script-src " + hashes(b"script") + b"; style-src "
            + hashes(b"style") + b"; connect-src 'self'; base-uri 'none'; form-action 'none'; "
            b"frame-ancestors 'none'")


PAGE = resources.files(__package__).joinpath("status.html").read_bytes()
# Headers of the page: a strict policy, no caching (the key may be in the URL), no referrer.
PAGE_HEADERS = (
    (b"Content-Security-Policy", _content_security_policy(PAGE)),
    (b"Cache-Control", b"no-store"),
    (b"Referrer-Policy", b"no-referrer"),
    (b"X-Content-Type-Options", b"nosniff"),
)
