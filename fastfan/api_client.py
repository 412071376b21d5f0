"""A client of the server API, for the shell (`fastfan publish`) and for scripts."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any


class ApiCallError(Exception):
    """The call failed; str() is one line: the HTTP status and the server's message."""


def call(api_url: str, key: str, method: str, body: bytes, timeout: float = 10.0) -> Any:
    """POST /api/METHOD and return the `result`."""
    request = urllib.request.Request(
        api_url.rstrip("/") + "/api/" + method, data=body, method="POST",
        headers={"Authorization": f"apikey {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())["result"]
    except urllib.error.HTTPError as exc:
        message = _error_message(exc.read()) or exc.reason
        raise ApiCallError(f"{exc.code} {message}") from None
    except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ApiCallError(f"no answer from {api_url}: {reason}") from None


def _error_message(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return ""
