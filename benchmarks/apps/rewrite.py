"""can_publish that checks and rewrites every message, as an application would."""

from __future__ import annotations

from typing import Any

import fastfan

app = fastfan.App()


@app.can_publish
async def rewrite(connection: fastfan.Connection, channel: str,
                  data: Any) -> fastfan.Publish:
    if not isinstance(data, dict) or "text" not in data:
        raise fastfan.ValidationError("a message needs 'text'")
    return fastfan.Publish(data={"text": data["text"], "user": connection.user})
