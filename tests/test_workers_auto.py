"""`--workers auto` counts the CPUs the process may use: its affinity and its cgroup's CPU
quota, not the host's core count (issue #27, item 5)."""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
from support.waiting import wait_for

from fastfan.config import cgroup_cpu_quota, cpu_count


def proc_of(tmp_path: Path, mountinfo: str, cgroup: str) -> Path:
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "mountinfo").write_text(mountinfo)
    (proc / "cgroup").write_text(cgroup)
    return proc


def test_a_cgroup_v2_quota_on_an_ancestor_caps_the_count(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    leaf = root / "kubepods" / "pod1" / "app"
    leaf.mkdir(parents=True)
    (root / "kubepods" / "cpu.max").write_text("max 100000\n")
    (root / "kubepods" / "pod1" / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs
    (leaf / "cpu.max").write_text("max 100000\n")
    proc = proc_of(tmp_path, f"30 23 0:26 / {root} rw,nosuid - cgroup2 cgroup2 rw\n",
                   "0::/kubepods/pod1/app\n")
    assert cgroup_cpu_quota(proc) == 1.5
    assert cpu_count(proc) == min(2, len(os.sched_getaffinity(0)))  # rounded up


def test_a_cgroup_v1_quota_caps_the_count_and_minus_one_is_none(tmp_path: Path) -> None:
    mount = tmp_path / "cpu,cpuacct"
    (mount / "docker" / "abc").mkdir(parents=True)
    (mount / "docker" / "abc" / "cpu.cfs_quota_us").write_text("50000\n")
    (mount / "docker" / "abc" / "cpu.cfs_period_us").write_text("100000\n")
    proc = proc_of(tmp_path, f"40 23 0:35 / {mount} rw - cgroup cgroup rw,cpu,cpuacct\n",
                   "4:cpu,cpuacct:/docker/abc\n")
    assert cgroup_cpu_quota(proc) == 0.5
    assert cpu_count(proc) == 1
    (mount / "docker" / "abc" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(proc) is None
    assert cpu_count(proc) == len(os.sched_getaffinity(0))


def test_without_a_cgroup_file_system_the_affinity_counts(tmp_path: Path) -> None:
    proc = proc_of(tmp_path, "", "0::/\n")
    assert cpu_count(proc) == len(os.sched_getaffinity(0))


CPU_CGROUP = Path("/sys/fs/cgroup/cpu")


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2 or not os.access(CPU_CGROUP, os.W_OK),
                    reason="needs 2 CPUs and a writable cgroup v1 cpu controller")
def test_auto_in_a_cgroup_with_one_cpu_of_quota_starts_one_worker(start_server: Any) -> None:
    group = CPU_CGROUP / f"fastfan-test-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        (group / "cpu.cfs_period_us").write_text("100000")
        (group / "cpu.cfs_quota_us").write_text("100000")
        server = start_server("--workers", "auto", wrapper=(
            "sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh"))
        started = wait_for(lambda: re.search(r"(\d+) worker\(s\)", server.log()))
        assert started.group(1) == "1"
        server.stop()
    finally:
        group.rmdir()
