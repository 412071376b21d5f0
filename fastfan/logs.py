"""Logging set-up: text or one JSON object per line; picows's per-connection chatter muted;
tokens never written."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from typing import Any

# A credential in a log line: an Authorization header's value, or a `token=` query value.
# picows logs the whole upgrade request at debug level as a bytes repr, where a line ends
# in the four characters `\r\n`: a value ends there, or at a real line end.
_CREDENTIAL = re.compile(r"(?i)(authorization:[ \t]*)(?:(?!\\[rn])[^\r\n])*"
                         r"|([?&]token=)(?:(?!\\[rn])[^\r\n &#'\"])*")
REDACTED = "[redacted]"


def redact(text: str) -> str:
    """`text` with every credential's value replaced by REDACTED."""
    return _CREDENTIAL.sub(lambda found: (found[1] or found[2]) + REDACTED, text)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": record.created,
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": redact(record.getMessage()),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, separators=(",", ":"))


def configure(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class PicowsLog:
    """The logger handed to picows.

    picows logs every accept and disconnect at INFO, and gives each connection a child
    `logging.Logger` when handed one (memory per connection). This object is not a
    Logger, so no children are made; protocol errors caused by clients go to DEBUG, and
    only picows's own failures (`exception`) reach our log as errors.
    """

    def __init__(self) -> None:
        self._log = logging.getLogger("fastfan.picows")
        self._pid = os.getpid()

    def isEnabledFor(self, level: int) -> bool:  # noqa: N802 - the logging API's name
        return level >= logging.ERROR or self._log.isEnabledFor(logging.DEBUG)

    def log(self, level: int, msg: str, *args: Any, **kwargs: Any) -> None:
        self._log.debug(msg, *args)

    def debug(self, msg: str, *args: Any, **kwargs: Any) -> None:
        self._log.debug(msg, *args)

    info = warning = error = debug

    def exception(self, msg: str, *args: Any, **kwargs: Any) -> None:
        self._log.error(msg, *args, exc_info=True)
