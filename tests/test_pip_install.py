"""A plain `pip install` of the checkout is the same server `./dev` builds: the picows it runs
on is the patched one vendored in fastfan/_picows, so a CLOSE ends the input, an oversized
request head gets 431, and an idle connection stays about 4 KiB.

The install is a fresh venv, no ./dev: what a user's deployment, container or CI does. It
builds both extensions, about 2 minutes on this 2-core machine (the dependencies come from
pip's cache after the first run). The checks (support/patched.py) are the very ones that
hold ./dev's build to those behaviours, run against a server started from that venv.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from support.patched import (
    FOLLOWERS,
    assert_a_header_block_over_16_kib_gets_431,
    assert_an_idle_subscribed_connection_costs_about_4_kib,
    assert_one_close_with_the_clients_code_then_eof,
    assert_the_server_still_serves_after_all_that,
)
from support.processes import children
from support.server import Server

ROOT = Path(__file__).resolve().parent.parent
VENDORED = "picows 2.3.1+fastfan.4 (vendored)"

pytestmark = [pytest.mark.timeout(1200), pytest.mark.slow]  # the build: minutes


def test_the_vendored_picows_is_upstream_with_the_patches() -> None:
    """fastfan/_picows is the picows sdist with patches/ applied, nothing else."""
    result = subprocess.run([sys.executable, ROOT / "patches" / "vendor_picows.py", "--check"],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv with the checkout pip-installed: its bin/fastfan."""
    work = tmp_path_factory.mktemp("pip")
    # A copy of what a clone holds (tracked files as they are now, and new ones not ignored):
    # pip builds in the source tree, which must not touch the checkout's own in-tree build.
    source = work / "fastfan"
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], cwd=ROOT, capture_output=True, check=True)
    for name in listed.stdout.decode().split("\0"):
        if name and (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    result = subprocess.run([venv / "bin" / "python", "-m", "pip", "install", source],
                            capture_output=True, text=True, timeout=1100, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return venv / "bin" / "fastfan"


@pytest.fixture
def start_installed(start_server: Callable[..., Server],
                    installed: Path) -> Callable[..., Server]:
    """start_server, but the server is the installed `fastfan` (conftest starts
    `<python> -m fastfan run ...`: this shell drops the first three words for its own)."""

    def start(*args: str) -> Server:
        server = start_server(*args, wrapper=("sh", "-c", 'shift 3; exec "$0" "$@"',
                                              str(installed)))
        assert f"WebSocket layer: {VENDORED}" in server.log()
        (worker,) = children(server.process.pid)
        # The worker runs the venv's picows, not the checkout's build of it.
        loaded = {line.split()[-1] for line in Path(f"/proc/{worker}/maps").read_text()
                  .splitlines() if "/_picows/picows.cpython" in line}
        assert len(loaded) == 1 and loaded.pop().startswith(f"{installed.parent.parent}/")
        return server

    return start


def test_a_close_ends_the_input(start_installed: Callable[..., Server]) -> None:
    server = start_installed("--echo-path", "/echo")
    for path in ("/", "/echo"):
        for follower in FOLLOWERS.values():
            assert_one_close_with_the_clients_code_then_eof(server, path, follower)
    assert_the_server_still_serves_after_all_that(server)


def test_an_oversized_request_head_gets_431(start_installed: Callable[..., Server]) -> None:
    assert_a_header_block_over_16_kib_gets_431(start_installed())


def test_an_idle_connection_costs_about_4_kib(start_installed: Callable[..., Server]) -> None:
    assert_an_idle_subscribed_connection_costs_about_4_kib(start_installed)
