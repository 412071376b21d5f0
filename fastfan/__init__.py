"""fastfan: a WebSocket publish/subscribe server built for fan-out."""

__version__ = "0.1.0"
