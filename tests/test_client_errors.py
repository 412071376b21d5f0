"""fastfan.client tells the application what happened: a refused connection, a token that
expired, a call before connect(), a self-signed wss:// server (issue #26, items 11-12)."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from support.server import Server, token
from support.tls import TlsServer

from fastfan.client import Client, ConnectionRefused


def run(test: Coroutine[Any, Any, None], timeout: float = 30.0) -> None:
    asyncio.run(asyncio.wait_for(test, timeout))


def test_a_refused_connection_raises_the_server_s_status_and_reason(server: Server) -> None:
    async def test() -> None:
        with pytest.raises(ConnectionRefused) as refused:
            await Client(server.url(), token="not-a-token").connect()
        assert refused.value.status == 401
        assert refused.value.reason.startswith("token is malformed")
        assert str(refused.value) == f"401: {refused.value.reason}"
    run(test())


def test_a_static_token_that_expired_ends_reconnecting_and_says_so(server: Server) -> None:
    async def test() -> None:
        errors: list[Exception] = []
        client = Client(server.url(), token=token("erin", ttl=2), reconnect_base=0.05,
                        ping_interval=None)
        client.on("error", errors.append)
        async with client:
            closed = asyncio.get_running_loop().create_future()
            client.on("disconnected", lambda code: closed.done() or closed.set_result(code))
            assert await closed == 4001  # the server closes at expiry
            started = time.monotonic()
            with pytest.raises(ConnectionRefused) as refused:  # a call waiting for the
                await client.stats()                           # connection: told at once
            assert time.monotonic() - started < client.request_timeout
            assert (refused.value.status, refused.value.reason) == (401, "token expired")
            assert errors == [refused.value]
    run(test())


def test_a_client_used_before_connect_fails_at_once_with_a_message(server: Server) -> None:
    async def test() -> None:
        client = Client(server.url(), token=token())
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="connect"):
            await client.publish("chat", "hi")
        assert time.monotonic() - started < 1
    run(test())


def test_connected_callbacks_registered_before_connect_hear_the_first_connection(
        server: Server) -> None:
    """As docs/clients.md shows: registered inside `async with`, they would not."""
    async def test() -> None:
        client = Client(server.url(), token=token())
        welcomes: list[dict[str, Any]] = []
        client.on("connected", welcomes.append)
        async with client:
            assert welcomes == [client.welcome]
    run(test())


def test_a_wss_server_with_a_certificate_only_ssl_trusts_is_reached_with_ssl(
        start_tls: Callable[..., TlsServer]) -> None:
    """Its CA (support/tls.py) is in no system store: without `ssl=` the handshake fails on
    the certificate; with the context that trusts that CA, messages go both ways."""
    server = start_tls()

    async def test() -> None:
        with pytest.raises(ssl.SSLCertVerificationError):
            await Client(server.url(), token=token()).connect()
        async with Client(server.url(), token=token(), ssl=server.context) as client:
            assert client.welcome is not None and client.welcome["type"] == "welcome"
            subscription = await client.subscribe("news")
            await client.publish("news", "over TLS")
            message = await anext(subscription)
            assert (message["channel"], message["data"]) == ("news", "over TLS")
    run(test())
