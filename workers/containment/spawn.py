"""How a contained process is started: its command line, environment and directories.

The command runs as ``[sh -c 'join cgroups; exec "$@"'] setpriv [user switch] --pdeathsig
KILL -- command``: the shell step (only where there are cgroups to join) writes its own
pid into the group's ``cgroup.procs`` files and resets the OOM score the agent protects
itself with, then execs util-linux ``setpriv``, which switches to the deployment's uid and
gid with no supplementary groups and ``no_new_privs``, sets the death signal and execs the
command, all in one pid. No ``preexec_fn``: that would make Python fork the whole agent.
"""

from __future__ import annotations

import ctypes
import os
import re
import shlex
import shutil
import signal
import stat
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from workers.containment.base import Group
from workers.containment.users import User

#: sets the user, no_new_privs and PR_SET_PDEATHSIG for the command it execs (util-linux)
SETPRIV = shutil.which("setpriv")
SH = shutil.which("sh") or "/bin/sh"
#: the OOM score an algorithm gets (the agent has -1000 as root): the kernel's choice on a
#: host out of memory is an algorithm, never the agent
ALGORITHM_OOM_SCORE_ADJ = 500
#: a URL with a password (scheme://user:password@host): never passed to an algorithm
_SECRET_URL = re.compile(r"\w+://[^/\s:@]*:[^/\s@]+@")
#: the agent's variables, never passed to an algorithm
_AGENT_PREFIXES = ("DM_", "CELERY_")


_libc: Any = None


def die_with_parent() -> None:
    """PR_SET_PDEATHSIG in the child, where util-linux's setpriv is missing (a preexec_fn)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL("libc.so.6", use_errno=True)
    _libc.prctl(1, signal.SIGKILL)


def algorithm_env(
    agent_env: Mapping[str, str], own: Mapping[str, Any], user: User | None, workdir: Path
) -> dict[str, str]:
    """The agent's environment without its own settings or anything carrying a password,
    then the algorithm's ``env`` and dm's variables (``own``)."""
    env = {k: v for k, v in agent_env.items() if not k.startswith(_AGENT_PREFIXES) and not _SECRET_URL.search(v)}
    if user is not None:  # the agent's home is not its home
        env.update(HOME=str(workdir), USER=str(user.uid), LOGNAME=str(user.uid))
    env.update({str(k): str(v) for k, v in own.items()})
    return env


def argv(command: list[str], group: Group | None, user: User | None, protected: bool) -> list[str]:
    """The full command line that starts ``command`` contained."""
    if SETPRIV is None:
        return command  # no util-linux: no user switch (Users says so) and a preexec_fn sets the death signal
    switch = []
    if user is not None:
        switch = [f"--reuid={user.uid}", f"--regid={user.gid}", "--clear-groups", "--no-new-privs"]
    line = [SETPRIV, *switch, "--pdeathsig", "KILL", "--", *command]
    joins = group.join_files() if group is not None else []
    if not joins and not protected:
        return line
    steps = [f"echo $$ >{shlex.quote(f)} || exit 126" for f in joins]
    if protected:
        steps.append(f"echo {ALGORITHM_OOM_SCORE_ADJ} >/proc/self/oom_score_adj")
    return [SH, "-c", "; ".join([*steps, 'exec "$@"']), "dm-start", *line]


def command_line(command: list[str], package: Path, interpreter: str = sys.executable) -> list[str]:
    """The command with ``python`` as ``interpreter`` and package files as absolute paths."""
    out = []
    for i, part in enumerate(command):
        if i == 0 and part in ("python", "python3"):
            out.append(interpreter)
        elif not os.path.isabs(part) and (package / part).exists():
            out.append(str(package / part))
        else:
            out.append(part)
    return out


def interpreter_for_others() -> str:
    """A Python that a process under another uid can run: this one when every directory
    up to it lets others in (a venv under a 0700 /root does not), else the system's."""
    for candidate in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3", shutil.which("python3") or ""):
        if candidate and _others_can_run(candidate):
            return candidate
    return "/usr/bin/python3"


def _others_can_run(path: str) -> bool:
    try:
        real = Path(os.path.realpath(path))
        if not real.is_file() or not real.stat().st_mode & stat.S_IXOTH:
            return False
        return all(parent.stat().st_mode & stat.S_IXOTH for parent in real.parents)
    except OSError:
        return False


def traversable(path: Path, made_below: Path) -> list[Path]:
    """Make ``path`` and the directories above it up to ``made_below`` (dm's own) passable,
    not listable, by others; returns the directories further up that others cannot pass."""
    blocked = []
    for d in [path, *path.parents]:
        mode = d.stat().st_mode
        if mode & stat.S_IXOTH:
            continue
        if d.is_relative_to(made_below) and d != made_below:
            d.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)
        else:
            blocked.append(d)
    return blocked


def own_workdir(workdir: Path, user: User | None) -> None:
    """The deployment's work dir: 0700 and its user's."""
    workdir.mkdir(parents=True, exist_ok=True)
    if user is not None:
        os.chown(workdir, user.uid, user.gid)
        workdir.chmod(0o700)


def lock_workdir(workdir: Path) -> None:
    """Take the work dir back from its uid (the next deployment given that uid cannot enter it)."""
    try:
        st = workdir.stat()
        if st.st_uid != os.geteuid():
            os.chown(workdir, os.geteuid(), os.getegid())
            workdir.chmod(0o700)
    except OSError:
        pass
