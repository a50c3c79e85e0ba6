"""Supervisor-side memory cgroups, with real processes and the real OOM killer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest


from actionpool.runner._cgroup import Cgroup, CgroupError, CgroupManager  # noqa: E402

MiB = 1 << 20
ROOT_NAME = "actionpool-test"

# Waits for "go" on stdin (so the test can move it into the cgroup first), then
# allocates and touches argv[1] MiB (bytes * n writes every page).
HOG = "import sys; sys.stdin.readline(); b = b'x' * (int(sys.argv[1]) << 20); print(len(b) >> 20, flush=True)"


@pytest.fixture
def manager() -> Iterator[CgroupManager]:
    mgr = CgroupManager.detect(ROOT_NAME)
    if mgr is None:
        pytest.skip("CgroupManager.detect() is None: no writable memory cgroup (needs root or a delegated "
                    "cgroup v2 subtree)")
    try:
        yield mgr
    finally:
        mgr.cleanup()


def run_in(cg: Cgroup, mib: int) -> tuple[int, str]:
    with subprocess.Popen([sys.executable, "-I", "-S", "-c", HOG, str(mib)], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as proc:
        cg.add(proc.pid)
        assert proc.pid in cg.procs()
        out, _ = proc.communicate(b"go\n", timeout=30)
    return proc.returncode, out.decode().strip()


def test_over_the_limit_is_oom_killed(manager: CgroupManager) -> None:
    cg = manager.create("hog", 64 * MiB)
    rc, out = run_in(cg, 200)
    assert rc == -signal.SIGKILL and out == ""
    assert cg.oom_killed() is True
    assert 32 * MiB < cg.peak_bytes() <= 64 * MiB


def test_within_the_limit_is_left_alone(manager: CgroupManager) -> None:
    cg = manager.create("modest", 64 * MiB)
    rc, out = run_in(cg, 16)
    assert (rc, out) == (0, "16")
    assert cg.oom_killed() is False
    assert cg.peak_bytes() >= 16 * MiB


def test_reset_makes_a_cgroup_reusable_after_an_oom(manager: CgroupManager) -> None:
    cg = manager.create("reused", 64 * MiB)
    assert run_in(cg, 200)[0] == -signal.SIGKILL and cg.oom_killed()
    cg.reset()
    assert cg.oom_killed() is False
    assert run_in(cg, 8) == (0, "8")
    assert cg.oom_killed() is False


def test_limits_are_written(manager: CgroupManager) -> None:
    cg = manager.create("limits", 96 * MiB, pids_max=7)
    if manager.version == "v1":
        assert int(Path(cg.memory_dir, "memory.limit_in_bytes").read_text()) == 96 * MiB
        memsw = Path(cg.memory_dir, "memory.memsw.limit_in_bytes")
        if memsw.exists():
            assert int(memsw.read_text()) == 96 * MiB
        if cg.pids_dir is not None:
            assert Path(cg.pids_dir, "pids.max").read_text().strip() == "7"
    else:
        assert int(Path(cg.memory_dir, "memory.max").read_text()) == 96 * MiB
        if Path(cg.memory_dir, "pids.max").exists():
            assert Path(cg.memory_dir, "pids.max").read_text().strip() == "7"


def test_pids_max_stops_thread_and_process_bombs(manager: CgroupManager) -> None:
    cg = manager.create("bomb", 64 * MiB, pids_max=3)
    pids_dir = cg.pids_dir or cg.memory_dir
    if not Path(pids_dir, "pids.max").exists():
        pytest.skip("no pids controller on this host")
    bomb = ("import sys, threading; sys.stdin.readline(); ev = threading.Event(); n = 0\n"
            "try:\n"
            "    for _ in range(20):\n"
            "        threading.Thread(target=ev.wait, daemon=True).start(); n += 1\n"
            "except RuntimeError:\n"
            "    pass\n"
            "print(n, flush=True); ev.set()\n")
    with subprocess.Popen([sys.executable, "-I", "-S", "-c", bomb], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE) as proc:
        cg.add(proc.pid)
        out, _ = proc.communicate(b"go\n", timeout=30)
    assert proc.returncode == 0
    assert int(out) == 2  # the main thread + 2 threads = pids.max


def test_cgroups_live_below_the_supervisors_own_cgroup(manager: CgroupManager) -> None:
    cg = manager.create("where", 64 * MiB)
    own = next(line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines()
               if (manager.version == "v1" and "memory" in line.split(":")[1].split(","))
               or (manager.version == "v2" and line.startswith("0::")))
    expected = f"{own.rstrip('/')}/{ROOT_NAME}/m{os.getpid()}-"
    assert expected in cg.memory_dir and cg.memory_dir.endswith("/where"), (expected, cg.memory_dir)


def test_remove_refuses_while_a_process_lives_then_cleanup_removes_everything() -> None:
    mgr = CgroupManager.detect(ROOT_NAME)
    if mgr is None:
        pytest.skip("CgroupManager.detect() is None: no writable memory cgroup")
    a = mgr.create("a", 64 * MiB)
    b = mgr.create("b", 64 * MiB)
    manager_dirs = {os.path.dirname(d) for d in a.dirs}
    with subprocess.Popen([sys.executable, "-I", "-S", "-c", "import sys; sys.stdin.readline()"],
                          stdin=subprocess.PIPE) as proc:
        a.add(proc.pid)
        with pytest.raises(CgroupError):
            a.remove()  # EBUSY: the process is still in there
        assert proc.stdin is not None
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0
    mgr.cleanup()
    for d in a.dirs + b.dirs + sorted(manager_dirs):
        assert not os.path.exists(d), d
    for root in {os.path.dirname(d) for d in manager_dirs}:  # shared: gone unless another supervisor uses it
        assert not os.path.exists(root) or os.listdir(root)
    assert mgr.cgroups == []


def test_a_removed_cgroup_is_forgotten(manager: CgroupManager) -> None:
    """A supervisor that starts a million workers keeps only the live ones' cgroups (issue 12: RSS bounded)."""
    kept = manager.create("kept", 64 * MiB)
    for i in range(200):
        cg = manager.create(f"w{i}", 64 * MiB)
        assert cg.try_remove() if i % 2 else (cg.remove() or True)
    assert manager.cgroups == [kept]
    assert len(manager._cgroups) == 1  # noqa: SLF001 - the bookkeeping itself, not a filtered view


def test_detect_sweeps_directories_of_dead_supervisors(manager: CgroupManager) -> None:
    cg = manager.create("alive", 64 * MiB)
    root = os.path.dirname(os.path.dirname(cg.memory_dir))
    stale = os.path.join(root, "m999999999-1")  # above pid_max: that supervisor is certainly dead
    os.mkdir(stale)
    os.mkdir(os.path.join(stale, "orphan"))
    other = CgroupManager.detect(ROOT_NAME)
    assert other is not None
    try:
        assert not os.path.exists(stale)
        assert os.path.exists(cg.memory_dir)  # a live supervisor's cgroups are left alone
    finally:
        other.cleanup()


def test_bad_names_are_refused(manager: CgroupManager) -> None:
    for name in ("", "a/b", "..", "."):
        with pytest.raises(ValueError):
            manager.create(name, 64 * MiB)
    with pytest.raises(ValueError):
        manager.create("x", 0)
    with pytest.raises(ValueError):
        CgroupManager.detect("../escape")
