"""Processes as /proc shows them: a server's workers, which one holds a connection, their
memory; and the C load generator of benchmarks/."""

from __future__ import annotations

import os
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent.parent / "benchmarks"


def process_state(pid: int) -> tuple[str, int]:
    """(state, parent pid) from /proc: state "Z" for a zombie, "gone" (parent 0) for none."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return "gone", 0
    return fields[0], int(fields[1])


def children(pid: int) -> list[int]:
    """The live child processes of `pid`, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            state, parent = process_state(int(entry.name))
            if parent == pid and state not in ("Z", "gone"):
                found.append(int(entry.name))
    return sorted(found)


def process_holding(local_port: int, candidates: list[int]) -> int | None:
    """Which of `candidates` holds the server end of our connection from `local_port`."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if remote_port == local_port:
                inodes.add(fields[9])
    for pid in candidates:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    return pid
        except OSError:
            continue
    return None


def memory_kib(pid: int, field: str) -> int:
    """A figure of /proc/PID/status in KiB: VmRSS (resident now), VmHWM (its peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field}")


def peak_rss_kib(pid: int) -> int:
    """The most resident memory `pid` has had so far (VmHWM)."""
    return memory_kib(pid, "VmHWM")


def loadgen() -> Path:
    """The C load generator of benchmarks/, built if it is not already."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    from lib import build_loadgen

    return build_loadgen()  # type: ignore[no-any-return]
