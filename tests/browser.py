"""Headless browsers on throwaway profiles: Chromium driven through its DevTools protocol,
Firefox (Debian's firefox-esr) through WebDriver BiDi on its --remote-debugging-port, with
no geckodriver: both are a WebSocket of JSON commands."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from support.waiting import wait_for
from support.wire import free_port
from websockets.exceptions import WebSocketException
from websockets.sync.client import ClientConnection, connect

CHROMIUM = shutil.which("chromium")
FIREFOX = shutil.which("firefox-esr") or shutil.which("firefox")
# Firefox's preferences for a test: nothing fetched from outside (updates, telemetry,
# safe browsing, captive portal checks: this machine's network is closed), no first-run UI.
FIREFOX_PREFERENCES = {
    "app.update.disabledForTesting": True,
    "app.normandy.enabled": False,
    "browser.safebrowsing.malware.enabled": False,
    "browser.safebrowsing.phishing.enabled": False,
    "browser.shell.checkDefaultBrowser": False,
    "browser.startup.homepage_override.mstone": "ignore",
    "datareporting.policy.dataSubmissionEnabled": False,
    "extensions.update.enabled": False,
    "network.captive-portal-service.enabled": False,
    "network.connectivity-service.enabled": False,
    "toolkit.telemetry.enabled": False,
}


class Browser:
    """Chromium showing `url`: the page runs in real time (a status page needs seconds to
    have rates to show, a client seconds to reconnect)."""

    def __init__(self, devtools: ClientConnection) -> None:
        self._devtools = devtools
        self._calls = 0

    def call(self, method: str, timeout: float = 30, **params: Any) -> Any:
        self._calls += 1
        self._devtools.send(json.dumps({"id": self._calls, "method": method, "params": params}))
        while True:
            answer = json.loads(self._devtools.recv(timeout=timeout))
            if answer.get("id") == self._calls:
                assert "error" not in answer, answer
                return answer["result"]

    def evaluate(self, expression: str, timeout: float = 30) -> Any:
        """The value of a JS expression; a promise is awaited, and a throw is an
        AssertionError carrying the page's message."""
        result = self.call("Runtime.evaluate", timeout=timeout, expression=expression,
                           returnByValue=True, awaitPromise=True)
        thrown = result.get("exceptionDetails")
        assert thrown is None, thrown.get("exception", {}).get("description", thrown)
        return result["result"].get("value")

    @classmethod
    @contextmanager
    def showing(cls, url: str) -> Iterator[Browser]:
        assert CHROMIUM is not None
        port = free_port()
        with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
            process = subprocess.Popen(
                [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--window-size=1280,900", f"--remote-debugging-port={port}",
                 f"--user-data-dir={profile}", url],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            try:
                page = wait_for(lambda: _page_target(port), timeout=30)
                with connect(page, max_size=None, open_timeout=10) as devtools:
                    yield cls(devtools)
            finally:
                os.killpg(process.pid, signal.SIGKILL)  # chromium and every helper it started
                process.wait()


def _page_target(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as answer:
            targets = json.loads(answer.read())
    except (OSError, WebSocketException):
        return None
    pages = [t["webSocketDebuggerUrl"] for t in targets if t.get("type") == "page"]
    return pages[0] if pages else None


class Firefox:
    """Headless Firefox showing `url`, driven through WebDriver BiDi; `evaluate` as
    Browser's (values cross as JSON, which is all the tests pass)."""

    def __init__(self, bidi: ClientConnection) -> None:
        self._bidi = bidi
        self._calls = 0
        self.call("session.new", capabilities={})
        self._context = self.call("browsingContext.getTree")["contexts"][0]["context"]

    def call(self, method: str, timeout: float = 30, **params: Any) -> Any:
        self._calls += 1
        self._bidi.send(json.dumps({"id": self._calls, "method": method, "params": params}))
        while True:
            answer = json.loads(self._bidi.recv(timeout=timeout))
            if answer.get("id") == self._calls:
                assert answer.get("type") == "success", answer
                return answer["result"]

    def evaluate(self, expression: str, timeout: float = 30) -> Any:
        result = self.call(
            "script.evaluate", timeout=timeout, target={"context": self._context},
            expression=f"(async () => JSON.stringify(await ({expression})))()",
            awaitPromise=True)
        assert result["type"] == "success", result["exceptionDetails"]["text"]
        value = result["result"]
        return None if value["type"] == "undefined" else json.loads(value["value"])

    @classmethod
    @contextmanager
    def showing(cls, url: str) -> Iterator[Firefox]:
        assert FIREFOX is not None
        port = free_port()
        with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
            with open(os.path.join(profile, "user.js"), "w") as prefs:
                prefs.writelines(f"user_pref({json.dumps(name)}, {json.dumps(value)});\n"
                                 for name, value in FIREFOX_PREFERENCES.items())
            process = subprocess.Popen(
                [FIREFOX, "--headless", "--no-remote", "--profile", profile,
                 f"--remote-debugging-port={port}", url],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            try:
                bidi = wait_for(lambda: _bidi_session(port), timeout=30)
                with bidi:
                    yield cls(bidi)
            finally:
                os.killpg(process.pid, signal.SIGKILL)  # firefox and its content processes
                process.wait()


def _bidi_session(port: int) -> ClientConnection | None:
    try:
        return connect(f"ws://127.0.0.1:{port}/session", max_size=None, open_timeout=5)
    except (OSError, WebSocketException):
        return None
