"""Start-up and its failures: ports that are not ours, workers that will not start, signals
while workers are forked, --api-host."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from support.api import KEY, request, start_api
from support.cli import assert_usage_error, fastfan
from support.processes import children
from support.server import token
from support.waiting import wait_for
from support.wire import RawClient, free_port

OTHER_SECRET = "another-secret-0123456789abcdef0123456789"


def test_a_second_fastfan_on_a_served_port_is_refused(start_server: Any) -> None:
    first = start_server("--workers", "2")
    second = fastfan("run", "--host", first.host, "--port", str(first.port),
                     "--jwt-secret", OTHER_SECRET)
    assert_usage_error(second, f"--port {first.port}", "in use")
    for _ in range(20):  # the first one's token passes on every connection: no stranger
        client = RawClient(first.host, first.port, f"/?token={token()}")
        assert client.recv_json()["type"] == "welcome"
        client.close()


def test_the_api_port_is_refused_too(start_server: Any) -> None:
    first, api_port = start_api(start_server)
    second = fastfan("run", "--insecure", "--host", first.host, "--port", str(free_port()),
                     "--api-port", str(api_port), "--api-key", KEY)
    assert_usage_error(second, f"--api-port {api_port}", "in use")


def test_a_port_another_program_holds_is_refused() -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        result = fastfan("run", "--insecure", "--host", "127.0.0.1", "--port", str(port))
    assert_usage_error(result, f"--port {port}", "in use")
    assert len(result.stderr.split("error: ")[1].splitlines()) == 1


@pytest.mark.parametrize("host, words", [
    ("192.0.2.1", ["--host 192.0.2.1", "not an address of this host"]),  # TEST-NET-1
    ("no-such-host.invalid", ["--host no-such-host.invalid"]),
])
def test_an_address_not_on_this_host_is_refused(host: str, words: list[str]) -> None:
    assert_usage_error(fastfan("run", "--insecure", "--host", host, "--port", "0"), *words)


def test_a_worker_killed_at_every_start_ends_the_server(start_server: Any) -> None:
    server = start_server("--workers", "2")
    survivor = children(server.process.pid)[0]
    deadline = time.monotonic() + 30
    while server.process.poll() is None and time.monotonic() < deadline:
        for pid in children(server.process.pid):  # the other worker, each time it is back
            if pid != survivor:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)
    assert server.process.wait(10) == 1
    assert re.search(r"ERROR .* worker \d died 6 times in a row within 10 s of starting, "
                     r"last: signal SIGKILL\n", server.log())
    assert server.log().count("restarting in") == 5


def test_a_worker_failing_at_start_ends_the_server_with_its_reason() -> None:
    # Too few file descriptors for a worker's event loop, enough for the master (10 to 15
    # do that here): the worker raises at every start.
    result = subprocess.run(
        ["prlimit", "--nofile=12:12", sys.executable, "-m", "fastfan", "run", "--insecure",
         "--host", "127.0.0.1", "--port", str(free_port())],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert re.search(r"ERROR .* worker 0 died 6 times in a row within 10 s of starting, "
                     r"last: \w+Error: ", result.stderr), result.stderr


@pytest.mark.parametrize("signo", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_workers_are_forked_is_honoured(tmp_path: Path, signo: int) -> None:
    log = tmp_path / "server.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "fastfan", "run", "--insecure", "--host", "127.0.0.1",
             "--port", str(free_port()), "--workers", "64"], stdout=output,
            stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: children(process.pid), timeout=30, interval=0.001)
            process.send_signal(signo)
            assert process.wait(15) == 0
        finally:
            process.kill()
            process.wait()
    stopped = re.search(r"(SIGTERM|SIGINT): stopping (\d+) workers", log.read_text())
    assert stopped is not None, log.read_text()
    assert stopped[1] == signal.Signals(signo).name
    assert int(stopped[2]) < 64  # the master forked no more once told to stop
    assert "Traceback" not in log.read_text()


def test_workers_above_the_bound_are_refused() -> None:
    assert_usage_error(fastfan("run", "--insecure", "--workers", "1000"), "--workers", "64")


def test_the_api_may_listen_elsewhere_than_the_clients(start_server: Any) -> None:
    # Another loopback address, one no test takes ephemeral ports from (127.0.0.2-9 are
    # clients' sources), as a backends-only interface.
    api_host = "127.0.0.10"
    api_port = free_port(api_host)
    server = start_server("--api-port", str(api_port), "--api-key", KEY,
                          "--api-host", api_host)
    wait_for(lambda: _answers(api_host, api_port))
    assert request(api_host, api_port, "GET", "/ready")[::2] == (200, b"ready\n")
    with pytest.raises(ConnectionRefusedError):
        request(server.host, api_port, "GET", "/health")
    assert server.get("/ready")[0] == 200  # the clients' port stays on --host


def _answers(host: str, port: int) -> bool:
    try:
        return request(host, port, "GET", "/health")[0] == 200
    except OSError:
        return False


def test_the_api_port_answers_ready_and_head(start_server: Any) -> None:
    server, api_port = start_api(start_server)
    assert request(server.host, api_port, "GET", "/ready")[::2] == (200, b"ready\n")
    for path in ("/ready", "/health", "/metrics"):
        status, headers, body = request(server.host, api_port, "HEAD", path)
        assert (status, body) == (200, b""), path
        assert int(headers["Content-Length"]) > 0
    status, headers, _ = request(server.host, api_port, "PUT", "/ready")
    assert (status, headers["Allow"]) == (405, "GET, HEAD")


def test_the_start_up_log_says_what_is_on(start_server: Any) -> None:
    plain = start_server("--workers", "2")
    plain.wait_ready()
    assert "2 worker(s), bus embedded" in plain.log()
    assert "TLS off; compression on (messages of 256 bytes or more); history off; " \
           "webhooks off" in plain.log()
    keeping = start_server("--history-size", "50", "--history-channels", "chat.*",
                           "--compression", "off")
    keeping.wait_ready()
    assert "compression off; history on (50 messages per channel matching chat.*, " \
           "300 s)" in keeping.log()
