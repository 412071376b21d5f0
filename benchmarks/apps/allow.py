"""can_publish that allows every message, the cheapest Python hook: what a hook costs."""

from __future__ import annotations

from typing import Any

import fastfan

app = fastfan.App()


@app.can_publish
async def allow(connection: fastfan.Connection, channel: str, data: Any) -> None:
    return None
