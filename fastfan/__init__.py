"""fastfan: a WebSocket publish/subscribe server built for fan-out."""

from .app import (
    App,
    Connection,
    Heartbeat,
    HookError,
    HookFailure,
    Identity,
    Message,
    Publish,
    Refuse,
    Request,
    ValidationError,
)

__version__ = "0.1.0"

__all__ = [
    "App",
    "Connection",
    "Heartbeat",
    "HookError",
    "HookFailure",
    "Identity",
    "Message",
    "Publish",
    "Refuse",
    "Request",
    "ValidationError",
    "__version__",
]
