"""Whom a node's algorithms run as.

When the agent is root, each deployment gets a uid (and the same gid) of its own from
``DM_UID_RANGE``, or all run as the one user ``DM_RUN_AS``; when the agent is not root, or
``DM_UID_RANGE=off``, they run as the agent's user (and the node says so). A uid is held with an ``flock`` on a
file named after it, so several agents on one host never hand out the same uid at once,
and an agent that dies lets go of its uids with its file descriptors.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import pwd
from dataclasses import dataclass
from pathlib import Path

from dm.errors import ConfigError

#: where the uid locks live (tmpfs: gone at reboot, with every process that held a uid)
LOCK_DIRS = (Path("/run/dm/uids"), Path("/var/lib/dm/uids"))
#: the lowest uid DM_UID_RANGE may start at (system users stay below)
MIN_UID = 1000


@dataclass(frozen=True)
class User:
    uid: int
    gid: int
    #: True when no other deployment runs as this uid (its processes are the deployment's)
    own: bool


class Users:
    """Hands out the user each deployment runs as."""

    def __init__(self, uid_range: str = "200000-265535", run_as: str = "", euid: int | None = None) -> None:
        self.euid = os.geteuid() if euid is None else euid
        self.off = uid_range.strip().lower() in ("off", "none") and not run_as
        #: True when algorithms run under another user than the agent's
        self.switches = self.euid == 0 and not self.off
        self.fixed: User | None = None
        self.first = self.last = 0
        self.held: dict[str, tuple[int, int]] = {}  # key -> (uid, lock fd)
        self.lock_dir: Path | None = None
        if not self.switches:
            return
        if run_as:
            try:
                entry = pwd.getpwnam(run_as) if not run_as.isdigit() else pwd.getpwuid(int(run_as))
            except KeyError as exc:
                raise ConfigError(f"DM_RUN_AS={run_as!r} is not a user of this host: create it or unset it") from exc
            if entry.pw_uid == 0:
                raise ConfigError("DM_RUN_AS names root: give an unprivileged user, or unset it")
            self.fixed = User(entry.pw_uid, entry.pw_gid, own=False)
            return
        self.first, self.last = parse_range(uid_range)

    def describe(self) -> str:
        if self.off:
            return f"the agent's user (uid {self.euid}: DM_UID_RANGE=off)"
        if not self.switches:
            return f"the agent's user (uid {self.euid}: not root, cannot switch users)"
        if self.fixed is not None:
            return f"user {pwd.getpwuid(self.fixed.uid).pw_name} (uid {self.fixed.uid})"
        return f"a uid per deployment ({self.first}-{self.last})"

    def acquire(self, key: str) -> User | None:
        """The user for ``key`` (a deployment id); None: the agent's own user."""
        if not self.switches:
            return None
        if self.fixed is not None:
            return self.fixed
        if key in self.held:
            uid = self.held[key][0]
            return User(uid, uid, own=True)
        lock_dir = self._lock_dir()
        size = self.last - self.first + 1
        start = int(hashlib.sha256(key.encode()).hexdigest()[:12], 16) % size
        for step in range(size):
            uid = self.first + (start + step) % size
            if any(uid == held for held, _ in self.held.values()):
                continue
            fd = os.open(lock_dir / str(uid), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self.held[key] = (uid, fd)
            return User(uid, uid, own=True)
        raise OSError(f"every uid of DM_UID_RANGE {self.first}-{self.last} is in use on this host")

    def release(self, key: str) -> None:
        held = self.held.pop(key, None)
        if held is not None:
            with contextlib.suppress(OSError):
                os.close(held[1])  # closing drops the flock

    def _lock_dir(self) -> Path:
        if self.lock_dir is None:
            for candidate in LOCK_DIRS:
                with contextlib.suppress(OSError):
                    candidate.mkdir(parents=True, exist_ok=True, mode=0o700)
                    candidate.chmod(0o700)
                    self.lock_dir = candidate
                    break
            else:
                raise OSError(f"cannot make a uid lock directory ({', '.join(map(str, LOCK_DIRS))})")
        return self.lock_dir


def parse_range(text: str) -> tuple[int, int]:
    first, sep, last = text.replace(" ", "").partition("-")
    try:
        lo, hi = int(first), int(last if sep else first)
    except ValueError:
        lo = hi = -1
    if lo < MIN_UID or hi < lo or hi >= 2**32 - 1:
        raise ConfigError(
            f"DM_UID_RANGE={text!r} must be like 200000-265535: first-last, from {MIN_UID} up, first <= last"
        )
    return lo, hi
