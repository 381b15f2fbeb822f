"""Node agents as processes of this machine, each in its own session so that a restart of
the control worker does not take them down; logs under ``DM_HOME/nodes``."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dm.control import Control
    from dm.registry import Doc


class LocalProvider:
    name = "local"
    starts_nodes = True

    def __init__(self) -> None:
        self.children: dict[str, subprocess.Popen[bytes]] = {}

    def choose_host(self, ctl: Control) -> str:
        return socket.gethostname()

    def start(self, ctl: Control, node_id: str, cpus: float, memory: float, host: str) -> int:
        s = ctl.settings
        logs = s.home / "nodes"
        logs.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **s.to_env()}
        cmd = [sys.executable, "-m", "workers", "--id", node_id, "--cpus", str(cpus), "--memory", str(memory)]
        # the URLs and the signing key go in the environment, never on the command line
        with open(os.open(logs / f"node-{node_id}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as out:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self.children[node_id] = proc
        return proc.pid

    def can_stop(self, ctl: Control, node: Doc) -> bool:
        return bool(node.get("pid")) and node.get("host") == socket.gethostname()

    def stop(self, ctl: Control, node: Doc) -> bool:
        asked = False
        if self.can_stop(ctl, node):
            try:
                os.kill(int(node["pid"]), signal.SIGTERM)
                asked = True
            except ProcessLookupError:
                pass
        self.exited()
        return asked

    def exited(self) -> list[str]:
        """Node ids whose agent process has exited (its children died with it)."""
        gone = [node_id for node_id, proc in self.children.items() if proc.poll() is not None]
        for node_id in gone:
            del self.children[node_id]
        return gone
