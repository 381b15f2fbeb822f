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
