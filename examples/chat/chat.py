"""The chat's own rules, whichever door asks: fastfan's Python hooks (hooks.py) or its HTTP
proxies (backend.py). Users live in the chat's own SQLite database; a user proves who it is
with the session key its login gave it, in a `chat_session` cookie."""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from http.cookies import SimpleCookie
from typing import Any

MAX_TEXT = 500
BANNED_WORDS = ("darn", "heck")
# Seeded into a new database, so that the example runs at once: (name, session key, display
# name, member of the staff room).
SEED = [("alice", "alice-key", "Alice", True), ("bob", "bob-key", "Bob", False)]


@dataclass(frozen=True)
class User:
    name: str
    display: str
    staff: bool


class ChatError(Exception):
    """A decision against the request: `code` and `message` are what the client gets."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Chat:
    def __init__(self, path: str | None = None) -> None:
        self.db = sqlite3.connect(path or os.environ.get("CHAT_DB", "chat.db"))
        self.db.execute("CREATE TABLE IF NOT EXISTS users (name TEXT PRIMARY KEY, key TEXT "
                        "UNIQUE, display TEXT, staff INTEGER)")
        self.db.executemany("INSERT OR IGNORE INTO users VALUES (?, ?, ?, ?)", SEED)
        self.db.commit()

    def who(self, cookie_header: str | None) -> User:
        """The user whose session the request's cookie names, or ChatError(401)."""
        cookie = SimpleCookie(cookie_header or "")
        key = cookie["chat_session"].value if "chat_session" in cookie else None
        row = None if key is None else self.db.execute(
            "SELECT name, display, staff FROM users WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise ChatError(401, "log in first: no valid chat_session cookie")
        return User(row[0], row[1], bool(row[2]))

    def user(self, name: str) -> User:
        row = self.db.execute("SELECT name, display, staff FROM users WHERE name = ?",
                              (name,)).fetchone()
        if row is None:
            raise ChatError(403, f"no user {name}")
        return User(row[0], row[1], bool(row[2]))

    def may_subscribe(self, user: User, channel: str) -> None:
        if channel.startswith("inbox.") and channel != f"inbox.{user.name}":
            raise ChatError(403, "someone else's inbox")
        if channel == "room.staff" and not user.staff:
            raise ChatError(403, "staff only")

    def message(self, user: User, data: Any) -> dict[str, Any]:
        """What a user's message becomes: checked, its text tidied and signed."""
        if not isinstance(data, dict) or not isinstance(data.get("text"), str):
            raise ChatError(400, 'a message is {"text": "..."}')
        text = " ".join(data["text"].split())
        if not text or len(text) > MAX_TEXT:
            raise ChatError(400, f"a message has 1 to {MAX_TEXT} characters")
        for word in BANNED_WORDS:
            text = text.replace(word, "*" * len(word))
        return {"text": text, "by": user.display}

    def members(self) -> list[str]:
        """The `members` RPC: every user's display name."""
        return [row[0] for row in self.db.execute("SELECT display FROM users ORDER BY name")]
