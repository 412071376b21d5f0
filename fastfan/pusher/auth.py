"""Pusher's signatures: a private or presence subscription's `auth`, and the HTTP API's
`auth_signature`. HMAC-SHA256 with the app's secret, hex, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

from . import PusherApp

# An API request's auth_timestamp may be this many seconds from our clock, either way.
TIMESTAMP_WINDOW = 600


class SignatureError(Exception):
    """A signature that does not check out; the message says what is wrong."""


def sign(secret: str, text: str) -> str:
    return hmac.new(secret.encode(), text.encode(), hashlib.sha256).hexdigest()


def check_channel_auth(app: PusherApp, socket_id: str, channel: str, auth: object,
                       channel_data: str | None) -> None:
    """`auth` is `key:HMAC(secret, socket_id:channel[:channel_data])` (what any Pusher
    server library's authorizeChannel makes)."""
    if not isinstance(auth, str) or ":" not in auth:
        raise SignatureError(f"subscribing to {channel} needs 'auth' from the app's auth "
                             "endpoint")
    key, _, signature = auth.partition(":")
    text = f"{socket_id}:{channel}" + ("" if channel_data is None else f":{channel_data}")
    if not hmac.compare_digest(key.encode(), app.key.encode()) or not hmac.compare_digest(
            signature.encode(), sign(app.secret, text).encode()):
        raise SignatureError(f"invalid signature for {channel}: the app's auth endpoint "
                             "must sign it with this app's key and secret")


def check_user_auth(app: PusherApp, socket_id: str, auth: object, user_data: object) -> None:
    """pusher:signin's `auth`: `key:HMAC(secret, socket_id::user::user_data)` (what any
    Pusher server library's authenticateUser makes)."""
    if not isinstance(user_data, str):
        raise SignatureError("pusher:signin needs 'user_data' from the app's user endpoint")
    if not isinstance(auth, str) or ":" not in auth:
        raise SignatureError("pusher:signin needs 'auth' from the app's user endpoint")
    key, _, signature = auth.partition(":")
    expected = sign(app.secret, f"{socket_id}::user::{user_data}")
    if not hmac.compare_digest(key.encode(), app.key.encode()) or not hmac.compare_digest(
            signature.encode(), expected.encode()):
        raise SignatureError("invalid signature: the app's user endpoint must sign it with "
                             "this app's key and secret")


def check_request(app: PusherApp, method: str, path: str, params: Mapping[str, str],
                  body: bytes, now: float) -> None:
    """An HTTP API request signed as the Pusher libraries sign it: `auth_key`,
    `auth_timestamp` within TIMESTAMP_WINDOW, `auth_version` 1.0, `body_md5` of a body,
    and `auth_signature` over `METHOD\\nPATH\\nsorted query without the signature`."""
    if params.get("auth_key") != app.key:
        raise SignatureError("auth_key is not this app's key")
    try:
        timestamp = int(params.get("auth_timestamp", ""))
    except ValueError:
        raise SignatureError("auth_timestamp missing or not a number") from None
    if abs(now - timestamp) > TIMESTAMP_WINDOW:
        raise SignatureError(f"auth_timestamp is more than {TIMESTAMP_WINDOW} s from the "
                             "server's clock: check the clocks")
    if params.get("auth_version") != "1.0":
        raise SignatureError("auth_version must be 1.0")
    if body and not hmac.compare_digest(params.get("body_md5", "").encode(),
                                        hashlib.md5(body).hexdigest().encode()):
        raise SignatureError("body_md5 does not match the body")
    signed = "&".join(f"{key}={params[key]}" for key in sorted(params)
                      if key != "auth_signature")
    expected = sign(app.secret, f"{method}\n{path}\n{signed}")
    if not hmac.compare_digest(params.get("auth_signature", "").encode(), expected.encode()):
        raise SignatureError("invalid auth_signature")
