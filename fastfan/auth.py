"""Client tokens: verify JWTs (HS256, or an identity provider's public keys), mint HS256
ones, and the channel patterns they grant."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import ssl
import threading
import time
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httptools
import jwt
import msgspec

from .keys import PUBLIC_KEY_ALGORITHMS, PublicKey, SecretKey, SigningKey, public_key_algorithm

if TYPE_CHECKING:
    from .config import Config

log = logging.getLogger("fastfan.auth")

# A token is a few hundred bytes; a header of kilobytes is an attack or a mistake, and
# refusing it before any base64 or JSON decoding bounds the work a stranger can cause.
MAX_TOKEN_LENGTH = 8192
# NumericDates beyond this (year ~31.7 million) are nonsense; it keeps float() exact and finite.
MAX_NUMERIC_DATE = 1e15
# The contract: `info` is what others see of a connection in presence and join/leave, sent
# with every such answer and event: a few fields, not a profile.
MAX_INFO_BYTES = 1024
# The contract: an unknown `kid` fetches the JWKS again at most once per 10 s.
JWKS_REFETCH_INTERVAL = 10.0
# A key set this old is fetched again on the next token, so dropped keys stop passing.
JWKS_MAX_AGE = 600.0
# A JWKS is a few kilobytes from a provider that answers in milliseconds: the whole fetch
# (connect, TLS, answer, redirects) gets this long by the wall clock. A timeout per read let
# a provider sending a byte every 2 s keep a worker from listening for over 25 s.
JWKS_TIMEOUT = 5.0
MAX_JWKS_BYTES = 1 << 20
# Redirects a JWKS URL may take, as urllib would follow them.
MAX_JWKS_REDIRECTS = 5


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
    """Who a connection is and what it may do; `expires_at` is epoch seconds or None;
    `info` the token's `info` claim as JSON text ("" without one): what others see of the
    connection in presence and join/leave."""

    user: str
    subscribe: ChannelPatterns
    publish: ChannelPatterns
    expires_at: float | None
    info: str = ""


ANONYMOUS = Identity("anonymous", ALLOW_ALL, ALLOW_ALL, None)


def _info_claim(claims: dict[str, Any]) -> str:
    """The `info` claim, any JSON value of at most MAX_INFO_BYTES, as JSON text."""
    if "info" not in claims:
        return ""
    return info_text(claims["info"], "claim 'info'")


def info_text(info: Any, what: str) -> str:
    """`info` (a token's claim, or an `authenticate` hook's Identity.info) as JSON text of
    at most MAX_INFO_BYTES, or AuthError naming `what`."""
    try:
        text = msgspec.json.encode(info)
    except UnicodeEncodeError:  # JSON's "\ud800": a lone surrogate has no UTF-8
        raise AuthError(f"{what} holds a lone surrogate (\\ud800-\\udfff), "
                        "which is not Unicode text") from None
    except (TypeError, msgspec.EncodeError) as exc:
        raise AuthError(f"{what} is not JSON: {exc}") from None
    if len(text) > MAX_INFO_BYTES:
        raise AuthError(f"{what} is {len(text)} bytes of JSON; at most {MAX_INFO_BYTES}")
    return text.decode()


def _patterns_claim(claims: dict[str, Any], name: str) -> ChannelPatterns:
    value = claims.get(name)
    if value is None:
        return ALLOW_ALL
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise AuthError(f"claim '{name}' must be a list of channel patterns")
    return ChannelPatterns(value)


class JwksKeys:
    """--jwks-url: an identity provider's public keys, chosen by the token header's `kid`.

    Fetched once when built, synchronously, with a timeout of JWKS_TIMEOUT seconds: a worker
    builds it before it accepts connections. After that, never on the event loop: a token
    whose `kid` the set lacks gets 401 "unknown key, try again" and starts a fetch in a
    background thread, at most one per JWKS_REFETCH_INTERVAL per worker, whatever the flood;
    the new set replaces the old when it arrives; one fetch at a time, each over within
    JWKS_TIMEOUT seconds whatever the provider does. A set older than JWKS_MAX_AGE is fetched
    again the same way, so keys the provider drops stop passing. A fetch that fails (the
    provider down, a bad answer) is logged and keeps the keys already known, so tokens with
    known keys still pass. A start with no keys refuses every token until a fetch succeeds.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._keys: dict[str, SigningKey] = {}
        self._fetched_at = -math.inf  # monotonic; when the set in _keys arrived
        self._next_fetch_at = 0.0  # monotonic; no background fetch starts before it
        self._fetching = False  # a background fetch runs; under _lock
        self._lock = threading.Lock()
        self.fetch()

    def key_for(self, header: dict[str, Any]) -> SigningKey:
        if header.get("alg") not in PUBLIC_KEY_ALGORITHMS:
            raise AuthError("token algorithm must be " + ", ".join(PUBLIC_KEY_ALGORITHMS))
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise AuthError("token header has no 'kid': this server's keys come from a JWKS")
        key = self._keys.get(kid)
        if key is None or time.monotonic() - self._fetched_at > JWKS_MAX_AGE:
            self._fetch_in_background()
        if key is None:
            raise AuthError("unknown key, try again: the token's 'kid' is not in the JWKS "
                            "(fetching it again)")
        return key

    def _fetch_in_background(self) -> None:
        with self._lock:
            now = time.monotonic()
            if self._fetching or now < self._next_fetch_at:
                return
            self._fetching = True
            self._next_fetch_at = now + JWKS_REFETCH_INTERVAL
        threading.Thread(target=self._fetch_then_allow_another, name="fastfan-jwks",
                         daemon=True).start()

    def _fetch_then_allow_another(self) -> None:
        try:
            self.fetch()
        finally:
            with self._lock:
                self._fetching = False

    def fetch(self) -> None:
        """Replace the set with the provider's; on failure log why and keep the old one."""
        try:
            keys = fetch_jwks(self.url)
        except Exception as exc:  # the network, HTTP, JSON: whatever it is, keep serving
            log.warning("JWKS %s not fetched (%s); keeping the %d keys known", self.url,
                        " ".join(str(exc).split()) or type(exc).__name__, len(self._keys))
            return
        self._keys, self._fetched_at = keys, time.monotonic()  # one swap: readers see either
        log.info("JWKS %s: %d signing keys", self.url, len(keys))


def fetch_jwks(url: str) -> dict[str, SigningKey]:
    """The signing keys of a JWKS by `kid`; keys of other kinds or uses are left out."""
    body = _download(url)
    if len(body) > MAX_JWKS_BYTES:
        raise ValueError(f"the JWKS is larger than {MAX_JWKS_BYTES} bytes")
    document = json.loads(body)
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWKS: expected a JSON object with a 'keys' list")
    keys = {}
    for jwk in document["keys"]:
        if not isinstance(jwk, dict) or not isinstance(jwk.get("kid"), str) \
                or jwk.get("use", "sig") != "sig":
            continue
        try:
            key = jwt.PyJWK(jwk).key
            algorithm = public_key_algorithm(key)
        except Exception:  # a private, symmetric or unsupported key: not ours to use
            log.debug("JWKS %s: key %r left out", url, jwk["kid"])
            continue
        if jwk.get("alg", algorithm) == algorithm:
            keys[jwk["kid"]] = SigningKey(key, algorithm)
    return keys


def _download(url: str) -> bytes:
    """GET `url`, over within JWKS_TIMEOUT seconds by the wall clock or TimeoutError.

    On an event loop of its own, in a thread of its own: the worker builds its keys while
    its own loop runs, and asyncio bounds the whole exchange (a blocking read only bounds
    each read). The join's margin covers a name lookup, which cannot be interrupted.
    """
    outcome: list[bytes | BaseException] = []

    def download() -> None:
        try:
            outcome.append(asyncio.run(asyncio.wait_for(_get(url), JWKS_TIMEOUT)))
        except BaseException as exc:  # handed to the caller's thread
            outcome.append(exc)

    thread = threading.Thread(target=download, name="fastfan-jwks-get", daemon=True)
    thread.start()
    thread.join(JWKS_TIMEOUT + 1)
    if not outcome or isinstance(outcome[0], TimeoutError):
        raise TimeoutError(f"no whole answer within {JWKS_TIMEOUT:g} s")
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


async def _get(url: str) -> bytes:
    """The body of a 200 answer to GET `url`, redirects followed."""
    for _ in range(MAX_JWKS_REDIRECTS + 1):
        status, location, body = await _get_once(url)
        if status in (301, 302, 303, 307, 308) and location:
            url = urllib.parse.urljoin(url, location)
            continue
        if status != 200:
            raise ValueError(f"HTTP {status}")
        return body
    raise ValueError(f"more than {MAX_JWKS_REDIRECTS} redirects")


class _Answer:
    """httptools' callbacks for one HTTP answer."""

    def __init__(self) -> None:
        self.location: str | None = None
        self.body = bytearray()
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"location":
            self.location = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True


async def _get_once(url: str) -> tuple[int, str | None, bytes]:
    """One GET: the status, the Location header and the body (MAX_JWKS_BYTES + 1 at most)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    https = parts.scheme == "https"
    reader, writer = await asyncio.open_connection(
        parts.hostname, parts.port or (443 if https else 80),
        ssl=ssl.create_default_context() if https else None)
    try:
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        writer.write(f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                     "Accept: application/json\r\nUser-Agent: fastfan\r\n"
                     "Connection: close\r\n\r\n".encode())
        answer = _Answer()
        parser = httptools.HttpResponseParser(answer)
        while not answer.complete and len(answer.body) <= MAX_JWKS_BYTES:
            data = await reader.read(65536)
            if not data:  # the end of an answer without a length, or one cut short
                break
            parser.feed_data(data)
        return parser.get_status_code(), answer.location, bytes(answer.body)
    finally:
        writer.close()


class TokenVerifier:
    """Checks a token's signature with one kind of key, then its claims, the same for all.

    `verify(token)` is the one callable the handshake and the in-band `refresh` share. The
    claims are checked here rather than by PyJWT, which takes `"exp": "123"` for a number and
    fails on `"exp": 1e400` with an OverflowError instead of a refusal.
    """

    def __init__(self, keys: SecretKey | PublicKey | JwksKeys, *, audience: str | None = None,
                 issuer: str | None = None) -> None:
        self.keys = keys
        self.audience = audience
        self.issuer = issuer

    def verify(self, token: str) -> Identity:
        """The identity a token grants, or AuthError with the reason it is refused."""
        return self.verify_claims(token)[0]

    def verify_claims(self, token: str) -> tuple[Identity, dict[str, Any]]:
        """verify, with the token's claims (an `authenticate` hook sees them)."""
        if len(token) > MAX_TOKEN_LENGTH:
            raise AuthError(f"token is longer than {MAX_TOKEN_LENGTH} bytes")
        if not token.isascii():
            raise AuthError("token is malformed: a JWT is ASCII (base64url and dots)")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as exc:
            raise AuthError(f"token is malformed: {exc}") from None
        except Exception:  # whatever PyJWT trips on, the token is to blame
            raise AuthError("token is malformed") from None
        key = self.keys.key_for(header)
        try:
            # PyJWT checks the signature, and the algorithm against the one the key fixes
            # (never `none`, never HS256 with a public key's text as the secret).
            claims = jwt.decode(token, key.key, algorithms=[key.algorithm], options={
                "verify_exp": False, "verify_nbf": False, "verify_iat": False,
                "verify_sub": False, "verify_jti": False, "verify_aud": False,
                "verify_iss": False})
        except jwt.InvalidAlgorithmError:
            raise AuthError(f"token algorithm must be {key.algorithm}") from None
        except jwt.InvalidSignatureError:
            raise AuthError("token signature is invalid") from None
        except jwt.InvalidTokenError as exc:
            raise AuthError(f"token is malformed: {exc}") from None
        except Exception:
            raise AuthError("token is malformed") from None
        return self._identity(claims), claims

    def _identity(self, claims: dict[str, Any]) -> Identity:
        if "sub" not in claims:
            raise AuthError("token has no 'sub' claim")
        user = claims["sub"]
        if not isinstance(user, str) or not user:
            raise AuthError("claim 'sub' must be a non-empty string")
        if not _is_unicode_text(user):  # it is sent to others, as UTF-8, in presence
            raise AuthError("claim 'sub' holds a lone surrogate (\\ud800-\\udfff), "
                            "which is not Unicode text")
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
        self._check_audience(claims.get("aud"))
        self._check_issuer(claims.get("iss"))
        return Identity(
            user=user,
            subscribe=_patterns_claim(claims, "subscribe"),
            publish=_patterns_claim(claims, "publish"),
            expires_at=expires_at,
            info=_info_claim(claims),
        )

    def _check_audience(self, audience: Any) -> None:
        """RFC 7519 4.1.3: a token for named audiences passes only where one of them is us."""
        if self.audience is None:
            if audience is not None:
                raise AuthError("token has an 'aud' claim and this server expects none "
                                "(it is started without --jwt-audience)")
            return
        if audience is None:
            raise AuthError("token has no 'aud' claim; this server requires one")
        audiences = [audience] if isinstance(audience, str) else audience
        if not isinstance(audiences, list) or not all(isinstance(a, str) for a in audiences):
            raise AuthError("claim 'aud' must be a string or a list of strings")
        if self.audience not in audiences:
            raise AuthError("token is for another audience ('aud' does not name this server)")

    def _check_issuer(self, issuer: Any) -> None:
        if self.issuer is None:
            return
        if issuer is None:
            raise AuthError("token has no 'iss' claim; this server requires one")
        if issuer != self.issuer:
            raise AuthError("token is from another issuer ('iss' is not the one trusted here)")


def _is_unicode_text(text: str) -> bool:
    """False for a str holding a lone surrogate, which JSON's \\u escapes can make."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


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
               publish: Sequence[str] | None = None, ttl: float | None = 3600,
               info: Any = None) -> str:
    """An HS256 token; `info` (any JSON value but null) becomes the `info` claim."""
    claims: dict[str, Any] = {"sub": user, "iat": int(time.time())}
    if info is not None:
        claims["info"] = info
    if ttl is not None:
        claims["exp"] = int(time.time() + ttl)
    if subscribe is not None:
        claims["subscribe"] = list(subscribe)
    if publish is not None:
        claims["publish"] = list(publish)
    return jwt.encode(claims, secret, algorithm="HS256")


def token_verifier(config: Config) -> TokenVerifier | None:
    """The verifier of the one token key the options give; None under --insecure."""
    keys: SecretKey | PublicKey | JwksKeys
    if config.jwt_secret is not None:
        keys = SecretKey(config.jwt_secret)
    elif config.jwt_public_key is not None:
        keys = PublicKey.from_file(config.jwt_public_key)
    elif config.jwks_url is not None:
        keys = JwksKeys(config.jwks_url)
    else:
        return None
    return TokenVerifier(keys, audience=config.jwt_audience, issuer=config.jwt_issuer)
