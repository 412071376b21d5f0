"""Every hook, each deciding by the channel or the user a test picks: `slow.*` sleeps past
the timeout, `crash.*` raises, `bad.*` answers what the hook cannot answer."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import fastfan

app = fastfan.App()
# sloth's publishes wait for it (in this worker)
sloth_gate = asyncio.Event()


class TooLongError(fastfan.HookError):
    """A HookError without an @app.errors handler: its own code and message go out."""

    code = 413


@app.authenticate
async def authenticate(request: fastfan.Request) -> fastfan.Identity:
    if request.claims is not None:  # a valid token: its user, and what the hook adds
        return fastfan.Identity(user=request.claims["sub"],
                                info={"via": "token", "path": request.path})
    user = request.query.get("user")
    if user is None:
        raise fastfan.Refuse(401, "say who you are: ?user=NAME")
    if user == "banned":
        raise fastfan.Refuse(403, "banned from this chat")
    if user == "teapot":
        raise fastfan.Refuse(299, "not an HTTP error status")
    if user == "crash":
        raise RuntimeError("the user database is on fire")
    if user == "bad":
        return "alice"  # type: ignore[return-value]
    if user == "slow":
        await asyncio.sleep(30)
    if user.startswith("later"):
        await asyncio.sleep(0.05)  # answered in a task: the upgrade waits for it
    host, _ = request.peer or ("?", 0)
    return fastfan.Identity(
        user=user, info={"name": user.title(), "agent": request.headers.get("user-agent"),
                         "host": host},
        channels=[f"inbox.{user}"],
        expires_at=time.time() + 1 if user.startswith(("renewed", "expiring")) else None)


@app.can_subscribe
async def can_subscribe(connection: fastfan.Connection, channel: str) -> None:
    if connection.user == "watcher":  # watches what the others' faulty publishes do
        return
    if channel.startswith("secret.") and connection.user != "boss":
        raise fastfan.Refuse(403, "members only")
    if channel.startswith("crash."):
        raise KeyError(channel)
    if channel.startswith("slow."):
        await asyncio.sleep(30)
    if channel.startswith("bad."):
        return 42  # type: ignore[return-value]
    if channel.startswith("wait."):
        await asyncio.sleep(0.3)


@app.can_publish
async def can_publish(connection: fastfan.Connection, channel: str,
                      data: Any) -> fastfan.Publish | None:
    if channel.startswith("orders."):
        if not isinstance(data, dict) or "item" not in data:
            raise fastfan.ValidationError("an order needs 'item'")
        return fastfan.Publish(data={**data, "by": connection.user})
    if channel.startswith("long.") and len(str(data)) > 10:
        raise TooLongError("at most 10 characters")
    if channel.startswith("quiet."):
        return fastfan.Publish(history=False)
    if channel.startswith("crash."):
        raise ZeroDivisionError("division by zero")
    if channel.startswith("slow."):
        await asyncio.sleep(30)
    if connection.user == "sloth":
        await sloth_gate.wait()  # until someone calls the rpc "release"
    if channel.startswith("bad."):
        return "yes"  # type: ignore[return-value]
    return None


@app.errors("validation")
async def validation(error: fastfan.HookError) -> dict[str, Any]:
    return {"code": 422, "message": f"invalid: {error.message}", "field": "data"}


@app.rpc("whoami")
async def whoami(connection: fastfan.Connection, data: Any) -> dict[str, Any]:
    return {"user": connection.user, "clientId": connection.client_id, "info": connection.info}


@app.rpc("add")
async def add(connection: fastfan.Connection, data: Any) -> Any:
    return data["a"] + data["b"]


@app.rpc("send")
async def send(connection: fastfan.Connection, data: Any) -> str:
    await connection.send(data)
    return "sent"


@app.rpc("metadata")
async def metadata(connection: fastfan.Connection, data: Any) -> dict[str, Any]:
    connection.metadata.update(data)
    return dict(connection.metadata)


@app.rpc("publish")
async def publish(connection: fastfan.Connection, data: Any) -> Any:
    return await app.publish(data["channel"], data["data"])


@app.rpc("close")
async def close(connection: fastfan.Connection, data: Any) -> None:
    await connection.close(4100, "bye")


@app.rpc("heartbeat")
async def heartbeat(connection: fastfan.Connection, data: Any) -> dict[str, Any]:
    status = connection.heartbeat
    return {"lastSeen": status.last_seen, "unanswered": status.unanswered,
            "alive": status.alive}


@app.rpc("sleep")
async def sleep(connection: fastfan.Connection, data: Any) -> str:
    await asyncio.sleep(data)
    return "awake"


@app.on_connect
async def on_connect(connection: fastfan.Connection) -> None:
    await connection.send({"hello": connection.user})


@app.on_disconnect
async def on_disconnect(connection: fastfan.Connection, code: int, reason: str) -> None:
    await app.publish("audit", {"left": connection.user, "code": code, "reason": reason})


@app.rpc("release")
async def release(connection: fastfan.Connection, data: Any) -> None:
    sloth_gate.set()


@app.on_message("orders.*")
async def receipt(message: fastfan.Message) -> None:
    """Every order, once per node: a receipt on `receipts`."""
    await app.publish("receipts", {"channel": message.channel, "order": message.data,
                                   "from": message.from_, "offset": message.offset})


@app.refresh
async def refresh(connection: fastfan.Connection) -> float | None:
    """`renewed` users get a minute more once; the others close with 4001."""
    if connection.user.startswith("renewed") and not connection.metadata.get("renewed"):
        connection.metadata["renewed"] = True
        return time.time() + 60
    return None


@app.rpc("plain")
def plain(connection: fastfan.Connection, data: Any) -> str:  # not async: a fault
    return "plain"
