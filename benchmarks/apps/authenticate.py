"""authenticate that lets everyone in as one user, the cheapest connect hook."""

from __future__ import annotations

import fastfan

app = fastfan.App()


@app.authenticate
async def everyone(request: fastfan.Request) -> fastfan.Identity:
    return fastfan.Identity(user="bench")
