"""Where the fence watchdog's state file lives (workers/watchdog.py): a private directory on
the host's tmpfs, else DM_HOME/nodes; the watchdog removes the tmpfs one as it exits."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest

from workers import watchdog


def test_the_state_file_is_in_a_private_directory_of_its_own_on_the_tmpfs(tmp_path: Path, monkeypatch) -> None:
    shm = tmp_path / "shm"
    shm.mkdir(mode=0o1777)
    monkeypatch.setattr(watchdog, "TMPFS", shm)
    first = watchdog.state_file(tmp_path / "home", "7")
    second = watchdog.state_file(tmp_path / "home", "7")  # a second agent of the same id: its own
    assert first.parent.parent == shm and second.parent.parent == shm and first != second
    assert first.parent.name.startswith("dm-node-7-")
    assert stat.S_IMODE(first.parent.stat().st_mode) == 0o700
    assert not (tmp_path / "home" / "nodes").exists()

    watchdog.write_state(first, 123.0, [4, 5], ["/x/cgroup.procs"], [200001])
    assert json.loads(first.read_text())["pgids"] == [4, 5]
    watchdog.forget(first)
    assert not first.parent.exists()
    assert second.parent.is_dir()  # the other agent's stays


def test_without_a_writable_tmpfs_the_state_file_is_in_dm_home(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(watchdog, "TMPFS", tmp_path / "no-such-dir")
    path = watchdog.state_file(tmp_path / "home", "7")
    assert path == tmp_path / "home" / "nodes" / "node-7.fence"
    assert path.parent.is_dir()
    watchdog.write_state(path, 123.0, [])
    watchdog.forget(path)  # kept: it shows what the node ran last
    assert path.is_file()


@pytest.mark.skipif(not os.access("/dev/shm", os.W_OK), reason="no writable /dev/shm on this host")
def test_the_watchdog_removes_its_tmpfs_state_when_its_agent_is_gone(tmp_path: Path) -> None:
    path = watchdog.state_file(tmp_path / "home", "unit")
    watchdog.write_state(path, 0.0, [])  # nothing listed: the final kill kills nothing
    pid = os.fork()
    if pid == 0:  # the "agent": forks the watchdog and exits at once
        try:
            watchdog.start(path)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    deadline = time.monotonic() + 10
    while path.parent.exists() and time.monotonic() < deadline:  # the watchdog sees its agent gone
        time.sleep(0.02)
    assert not path.parent.exists(), "the watchdog left its state directory on the tmpfs"


@pytest.mark.parametrize("after", [0.0, 0.0005, 0.002, 0.01, 0.05])
def test_an_agent_that_dies_at_any_point_of_its_watchdogs_start_takes_the_listed_processes(
    tmp_path: Path, after: float
) -> None:
    # Given processes of their own sessions (as a setsid double-fork makes) listed in the state
    import subprocess

    path = tmp_path / "fence"
    for _ in range(4):
        victim = subprocess.Popen(["sleep", "600"], start_new_session=True)
        try:
            watchdog.write_state(path, time.time() + 600, [victim.pid])  # not stale: only the agent's death kills
            # When the agent dies `after` seconds into its watchdog's start (its setup of the
            # death signal, the loop, or the loop's end)
            pid = os.fork()
            if pid == 0:
                try:
                    watchdog.start(path)
                    time.sleep(after)
                finally:
                    os._exit(0)
            os.waitpid(pid, 0)
            # Then the watchdog kills them before it exits
            victim.wait(timeout=10)
        finally:
            if victim.poll() is None:
                victim.kill()
                victim.wait()
        assert victim.returncode == -9


def _gone_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    import subprocess

    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_an_agent_start_sweeps_what_agents_killed_with_their_watchdogs_left(tmp_path: Path, monkeypatch) -> None:
    # Given state directories on the tmpfs: of an agent killed with its watchdog (gone, nothing
    # changed for longer than SWEEP_AFTER), of one gone a moment ago (its watchdog may still be
    # at its final kill), of a live agent cut off for as long, and one of an older name (no pid)
    shm = tmp_path / "shm"
    shm.mkdir(mode=0o1777)
    monkeypatch.setattr(watchdog, "TMPFS", shm)
    home = tmp_path / "home"
    long_ago = time.time() - watchdog.SWEEP_AFTER - 60
    dead = _gone_pid()

    def made(name: str, old: bool) -> Path:
        d = shm / name
        d.mkdir(mode=0o700)
        watchdog.write_state(d / "fence", 1.0, [dead])
        if old:
            for p in (d / "fence", d):
                os.utime(p, (long_ago, long_ago))
        return d

    stale = made(f"dm-node-3-pid{dead}-abc123de", old=True)
    recent = made(f"dm-node-4-pid{dead}-fgh456ij", old=False)
    live = made(f"dm-node-5-pid{os.getpid()}-klm789no", old=True)
    legacy = made("dm-node-6-pqr012st", old=True)
    other = shm / "PostgreSQL.1234"  # not dm's
    other.write_text("")

    # When an agent starts and makes its own
    mine = watchdog.state_file(home, "7")

    # Then only the directory of the agent gone long ago is removed; its own name holds its pid
    assert not stale.exists()
    assert recent.is_dir() and live.is_dir() and legacy.is_dir() and other.exists()
    assert mine.parent.is_dir() and mine.parent.name.startswith(f"dm-node-7-pid{os.getpid()}-")
    assert watchdog.sweep(shm) == []  # nothing more to sweep


def test_the_sweep_reads_a_node_id_with_dashes_and_leaves_other_users_directories(tmp_path: Path) -> None:
    dead = _gone_pid()
    assert watchdog._owner(f"dm-node-h-12-pid{dead}-a_b9cd0e") == dead
    assert watchdog._owner("dm-node-h-12-a_b9cd0e") is None  # an older name: no pid in it
    assert watchdog._owner("dm-node-7-pidx-a_b9cd0e") is None
    assert watchdog._owner("other-1-2-3") is None
    if os.getuid() != 0:
        pytest.skip("needs root to make a directory of another user")
    d = tmp_path / f"dm-node-1-pid{dead}-zzzzzzzz"
    d.mkdir()
    os.chown(d, 65534, 65534)
    old = time.time() - watchdog.SWEEP_AFTER - 60
    os.utime(d, (old, old))
    assert watchdog.sweep(tmp_path) == [] and d.is_dir()


def test_an_exited_process_not_yet_reaped_is_not_alive_for_the_sweeps() -> None:
    # an agent killed with kill -9 is a zombie until its launcher reaps it: what it left is
    # swept meanwhile (the tmpfs state here, its cgroup scopes in workers/containment)
    from workers.containment.base import alive

    pid = os.fork()
    if pid == 0:
        os._exit(0)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline, "the child did not exit"
        time.sleep(0.01)
    try:
        assert not alive(pid)
        assert alive(os.getpid()) and alive(1)
    finally:
        os.waitpid(pid, 0)
    assert not alive(pid)
