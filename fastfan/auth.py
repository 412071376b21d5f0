"""Client tokens: verify and mint HS256 JWTs, and the channel patterns they grant."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import jwt

# A token is a few hundred bytes; a header of kilobytes is an attack or a mistake, and
# refusing it before any base64 or JSON decoding bounds the work a stranger can cause.
MAX_TOKEN_LENGTH = 8192
# NumericDates beyond this (year ~31.7 million) are nonsense; it keeps float() exact and finite.
MAX_NUMERIC_DATE = 1e15


class AuthError(Exception):
    """The token is missing or not acceptable; str() is the one-line reason for the 401."""


class ChannelPatterns:
    """A token's `subscribe` or `publish` claim: `*` matches any run of characters.

    Matched piece by piece with str.find, never by a backtracking regex: a claim such as
    `*.*.*.*.x` against a channel of many dots took seconds per check as a regex.
    """

    __slots__ = ("_exact", "_globs", "allows_all")

    def __init__(self, patterns: Iterable[str]) -> None:
        patterns = list(patterns)
        self.allows_all = any(p and not p.strip("*") for p in patterns)
        self._exact = frozenset(p for p in patterns if "*" not in p)
        self._globs = tuple(_Glob(p) for p in patterns if "*" in p)

    def allows(self, channel: str) -> bool:
        if self.allows_all or channel in self._exact:
            return True
        return any(glob.matches(channel) for glob in self._globs)


class _Glob:
    """A pattern with at least one `*`, as the pieces between its stars.

    The first piece anchors the start, the last the end; each piece between is taken at
    its leftmost place after the one before, which is never worse than a later place.
    Time: linear in the channel's length per piece, whatever the pattern.
    """

    __slots__ = ("first", "last", "middle", "shortest")

    def __init__(self, pattern: str) -> None:
        first, *middle, last = pattern.split("*")
        self.first, self.last = first, last
        self.middle = tuple(piece for piece in middle if piece)  # `**` is `*`
        self.shortest = len(first) + sum(map(len, self.middle)) + len(last)

    def matches(self, text: str) -> bool:
        if len(text) < self.shortest or not text.startswith(self.first) \
                or not text.endswith(self.last):
            return False
        position, end = len(self.first), len(text) - len(self.last)
        for piece in self.middle:
            found = text.find(piece, position, end)
            if found < 0:
                return False
            position = found + len(piece)
        return True


ALLOW_ALL = ChannelPatterns(["*"])


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a connection is and what it may do; `expires_at` is epoch seconds or None."""

    user: str
    subscribe: ChannelPatterns
    publish: ChannelPatterns
    expires_at: float | None


ANONYMOUS = Identity("anonymous", ALLOW_ALL, ALLOW_ALL, None)


def _patterns_claim(claims: dict[str, Any], name: str) -> ChannelPatterns:
    value = claims.get(name)
    if value is None:
        return ALLOW_ALL
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise AuthError(f"claim '{name}' must be a list of channel patterns")
    return ChannelPatterns(value)


def verify_token(secret: str, token: str) -> Identity:
    """The identity a token grants, or AuthError with the reason it is refused.

    The claims are checked here rather than by PyJWT, which takes `"exp": "123"` for a
    number and fails on `"exp": 1e400` with an OverflowError instead of a refusal.
    """
    if len(token) > MAX_TOKEN_LENGTH:
        raise AuthError(f"token is longer than {MAX_TOKEN_LENGTH} bytes")
    if not token.isascii():
        raise AuthError("token is malformed: a JWT is ASCII (base64url and dots)")
    try:
        # PyJWT checks the signature and the algorithm; the claims are checked below.
        claims = jwt.decode(token, secret, algorithms=["HS256"], options={
            "verify_exp": False, "verify_nbf": False, "verify_iat": False,
            "verify_sub": False, "verify_jti": False})
    except jwt.InvalidAlgorithmError:
        raise AuthError("token algorithm must be HS256") from None
    except jwt.InvalidSignatureError:
        raise AuthError("token signature is invalid") from None
    except jwt.InvalidTokenError as exc:
        raise AuthError(f"token is malformed: {exc}") from None
    except Exception:  # whatever PyJWT trips on, the token is to blame
        raise AuthError("token is malformed") from None
    if "sub" not in claims:
        raise AuthError("token has no 'sub' claim")
    user = claims["sub"]
    if not isinstance(user, str) or not user:
        raise AuthError("claim 'sub' must be a non-empty string")
    now = time.time()
    expires_at = _time_claim(claims, "exp")
    if expires_at is not None and expires_at <= now:
        raise AuthError("token expired")
    not_before = _time_claim(claims, "nbf")
    if not_before is not None and not_before > now:
        raise AuthError("token not valid yet (nbf is in the future)")
    issued_at = _time_claim(claims, "iat")
    if issued_at is not None and issued_at > now:
        raise AuthError("token not valid yet (iat is in the future)")
    return Identity(
        user=user,
        subscribe=_patterns_claim(claims, "subscribe"),
        publish=_patterns_claim(claims, "publish"),
        expires_at=expires_at,
    )


def _time_claim(claims: dict[str, Any], name: str) -> float | None:
    """A NumericDate (RFC 7519 2): a JSON number of seconds, not a string, bool or 1e400."""
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not -MAX_NUMERIC_DATE < value < MAX_NUMERIC_DATE:  # also false for NaN
        raise AuthError(f"claim '{name}' must be a number of seconds since the epoch")
    return float(value)


def mint_token(secret: str, user: str, *, subscribe: Sequence[str] | None = None,
               publish: Sequence[str] | None = None, ttl: float | None = 3600) -> str:
    claims: dict[str, Any] = {"sub": user, "iat": int(time.time())}
    if ttl is not None:
        claims["exp"] = int(time.time() + ttl)
    if subscribe is not None:
        claims["subscribe"] = list(subscribe)
    if publish is not None:
        claims["publish"] = list(publish)
    return jwt.encode(claims, secret, algorithm="HS256")
