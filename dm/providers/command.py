"""Nodes started and stopped elsewhere through command templates.

``DM_NODE_START_COMMAND`` starts one node, e.g.::

    ssh {host} dm node --id {node_id} --cpus {cpus} --memory {memory} --redis {redis_url} --mongo {mongo_url}

``DM_NODE_STOP_COMMAND`` stops one, e.g. ``ssh {host} kill -TERM {pid}`` (a SIGTERM makes
the agent hand its deployments over). ``DM_NODE_HOSTS`` lists the hosts (comma- or
space-separated); each new node goes to the host with the fewest live nodes.

A template is split like a shell line (``shlex``) and each word filled in with
``str.format``; it is never run through a shell, so a value cannot inject a command.
Placeholders: ``{node_id} {host} {cpus} {memory} {redis_url} {mongo_url} {python}``,
and for the stop command also ``{pid} {address}`` as the node reported them.

The start command may stay in the foreground (ssh) or return at once (systemd-run):
its exit is not taken as the node's death, since an ssh session can drop while its
node lives on; the lease decides. Its output goes to ``DM_HOME/nodes/node-<id>.log``.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess
import sys
from typing import TYPE_CHECKING, Any

from dm.errors import ConfigError

if TYPE_CHECKING:
    from dm.control import Control
    from dm.registry import Doc

log = logging.getLogger(__name__)

#: seconds a stop command may take
STOP_TIMEOUT = 30.0
LIVE_STATES = ("starting", "up")


def hosts(ctl: Control) -> list[str]:
    return [h for h in re.split(r"[\s,]+", ctl.settings.node_hosts) if h]


def render(template: str, values: dict[str, Any], setting: str) -> list[str]:
    """The template as an argument list with each word's placeholders filled in."""
    try:
        words = shlex.split(template)
        return [word.format_map(values) for word in words]
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(
            f"cannot use {setting}={template!r}: {exc!r}; known placeholders: "
            + " ".join("{" + k + "}" for k in sorted(values))
        ) from exc


class CommandProvider:
    name = "command"
    starts_nodes = True

    def __init__(self) -> None:
        #: the start commands still running, by node id (reaped, never taken as a death)
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def choose_host(self, ctl: Control) -> str:
        choices = hosts(ctl)
        if not choices:
            return ""
        live: dict[str, int] = dict.fromkeys(choices, 0)
        for node in ctl.registry.list_nodes(LIVE_STATES):
            if node.get("provider") == self.name and node.get("provider_host") in live:
                live[node["provider_host"]] += 1
        return min(choices, key=lambda h: live[h])  # ties: the first listed

    def start(self, ctl: Control, node_id: str, cpus: float, memory: float, host: str) -> int:
        s = ctl.settings
        if not s.node_start_command:
            raise ConfigError(
                "DM_PROVIDER=command needs DM_NODE_START_COMMAND, e.g. "
                "'ssh {host} dm node --id {node_id} --redis {redis_url} --mongo {mongo_url}'"
            )
        values = {"node_id": node_id, "host": host, "cpus": cpus, "memory": memory,
                  "redis_url": s.redis_url, "mongo_url": s.mongo_url, "python": sys.executable}  # fmt: skip
        argv = render(s.node_start_command, values, "DM_NODE_START_COMMAND")
        logs = s.home / "nodes"
        logs.mkdir(parents=True, exist_ok=True)
        self.exited()
        with open(logs / f"node-{node_id}.log", "ab") as out:
            try:
                proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    env={**os.environ, **s.to_env()}, start_new_session=True,
                )  # fmt: skip
            except OSError as exc:
                raise ConfigError(f"cannot run DM_NODE_START_COMMAND ({shlex.join(argv)}): {exc}") from exc
        self.running[node_id] = proc
        log.info("node-%s: started %s (pid %s)", node_id, shlex.join(argv), proc.pid)
        return proc.pid

    def can_stop(self, ctl: Control, node: Doc) -> bool:
        return bool(ctl.settings.node_stop_command)

    def stop(self, ctl: Control, node: Doc) -> bool:
        s = ctl.settings
        if not s.node_stop_command:
            log.warning("node-%s: no DM_NODE_STOP_COMMAND, so it cannot be stopped from here", node["_id"])
            return False
        values = {"node_id": node["_id"], "host": node.get("provider_host") or "", "pid": node.get("pid") or "",
                  "address": node.get("address") or "", "cpus": node.get("cpus"), "memory": node.get("memory"),
                  "redis_url": s.redis_url, "mongo_url": s.mongo_url, "python": sys.executable}  # fmt: skip
        argv = render(s.node_stop_command, values, "DM_NODE_STOP_COMMAND")
        try:
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=STOP_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("node-%s: stop command %s failed: %s", node["_id"], shlex.join(argv), exc)
            return False
        if done.returncode != 0:
            err = done.stderr.decode(errors="replace").strip()
            log.warning("node-%s: stop command %s exited %s: %s", node["_id"], shlex.join(argv), done.returncode, err)
        self.exited()
        return done.returncode == 0

    def exited(self) -> list[str]:
        """Reaps finished start commands; never a death signal (see the module docstring)."""
        for node_id, proc in list(self.running.items()):
            if proc.poll() is not None:
                del self.running[node_id]
                if proc.returncode != 0:
                    log.warning("node-%s: its start command exited %s", node_id, proc.returncode)
        return []
