"""An App without publish hooks: publishes must cost what they cost without --app."""

from __future__ import annotations

from typing import Any

import fastfan

app = fastfan.App()


@app.rpc("ping")
async def ping(connection: fastfan.Connection, data: Any) -> str:
    return "pong"
