"""The chat as fastfan hooks in Python: `fastfan run --app hooks:app` in this folder."""

from __future__ import annotations

from typing import Any

from chat import Chat, ChatError

import fastfan

app = fastfan.App()
chat = Chat()  # SQLite on a local file answers in microseconds: no thread needed here


@app.authenticate
async def authenticate(request: fastfan.Request) -> fastfan.Identity:
    try:
        user = chat.who(request.headers.get("Cookie"))
    except ChatError as refused:
        raise fastfan.Refuse(refused.code, refused.message) from None
    return fastfan.Identity(user=user.name, info={"name": user.display},
                            channels=[f"inbox.{user.name}"])


@app.can_subscribe
async def can_subscribe(connection: fastfan.Connection, channel: str) -> None:
    try:
        chat.may_subscribe(chat.user(connection.user), channel)
    except ChatError as refused:
        raise fastfan.Refuse(refused.code, refused.message) from None


@app.can_publish
async def can_publish(connection: fastfan.Connection, channel: str,
                      data: Any) -> fastfan.Publish:
    try:
        return fastfan.Publish(data=chat.message(chat.user(connection.user), data))
    except ChatError as refused:
        raise fastfan.Refuse(refused.code, refused.message) from None


@app.rpc("members")
async def members(connection: fastfan.Connection, data: Any) -> list[str]:
    return chat.members()
