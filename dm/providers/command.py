"""Nodes started and stopped elsewhere through command templates.

``DM_NODE_START_COMMAND`` starts one node, e.g.::

    ssh {host} dm node --env-file - --id {node_id} --cpus {cpus} --memory {memory}

``DM_NODE_STOP_COMMAND`` stops one, e.g. ``ssh {host} kill -TERM {pid}`` (a SIGTERM makes
the agent hand its deployments over). ``DM_NODE_HOSTS`` lists the hosts (comma- or
space-separated); each new node goes to the host with the fewest live nodes.

A template is split like a shell line (``shlex``) and each word filled in with
``str.format``; it is never run through a shell, so a value cannot inject a command.
Placeholders: ``{node_id} {host} {cpus} {memory} {env_file} {python}``, and for the stop
command also ``{pid} {address}`` as the node reported them.

Credentials never go on a command line (``ps`` and ``/proc/PID/cmdline`` show it to every
user of both hosts): the start command gets ``DM_REDIS_URL``, ``DM_MONGO_URL``,
``DM_SIGNING_KEY`` and the rest as ``KEY=value`` lines on its standard input (ssh passes
them to ``dm node --env-file -``), and in a 0600 file, ``{env_file}``
(``DM_HOME/nodes/node-<id>.env``), for a command that copies it or a shared file system.
``{redis_url}`` and ``{mongo_url}`` still work for URLs without a password; with one they
are refused. Neither the log nor an error message shows a whole command line: only the
program and the template, with every secret replaced by ``***``.

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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dm import signing
from dm.errors import ConfigError
from dm.settings import Settings, mask_url

if TYPE_CHECKING:
    from dm.control import Control
    from dm.registry import Doc

log = logging.getLogger(__name__)

#: seconds a stop command may take
STOP_TIMEOUT = 30.0
LIVE_STATES = ("starting", "up")


def hosts(ctl: Control) -> list[str]:
    return [h for h in re.split(r"[\s,]+", ctl.settings.node_hosts) if h]


#: settings a node agent needs from the control plane, passed on stdin and in the env file
NODE_ENV = ("redis_url", "mongo_url", "kafka_bootstrap", "database", "signing_key", "lease_ttl",
            "metrics_interval", "retention", "log_max_size", "log_keep")  # fmt: skip


def render(template: str, values: dict[str, Any], setting: str) -> list[str]:
    """The template as an argument list with each word's placeholders filled in.

    ``{redis_url}``/``{mongo_url}`` carrying a password are refused: they would be on a
    command line for every user of both hosts to read."""
    try:
        words = shlex.split(template)
        argv = [word.format_map(values) for word in words]
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(
            f"cannot use {setting}={template!r}: {exc!r}; known placeholders: "
            + " ".join("{" + k + "}" for k in sorted(values))
        ) from exc
    for name in ("redis_url", "mongo_url"):
        url = str(values.get(name) or "")
        if "{" + name + "}" in template and mask_url(url) != url:
            raise ConfigError(
                f"{setting} puts {{{name}}} on the node's command line, and that URL carries a password: "
                "drop it and give the node `dm node --env-file -` (the URLs come on its stdin) or {env_file}"
            )
    return argv


def node_env(settings: Settings) -> dict[str, str]:
    """The ``DM_*`` settings a node on another host needs, the signing key included."""
    env = {f"DM_{name.upper()}": str(getattr(settings, name)) for name in NODE_ENV if getattr(settings, name) != ""}
    env["DM_SIGNING_KEY"] = signing.signing_key(settings).decode()
    return env


def env_lines(env: dict[str, str]) -> bytes:
    """``KEY=value`` lines, as ``dm node --env-file`` reads them."""
    return "".join(f"{k}={v}\n" for k, v in env.items()).encode()


def write_env_file(path: Path, env: dict[str, str]) -> Path:
    """Write ``env`` to a file only its owner can read (made 0600 before a byte is written)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)  # an older file of looser mode is tightened too
        f.write(env_lines(env))
    return path


def scrub(text: str, secrets: list[str]) -> str:
    """``text`` with each secret replaced by ``***`` (for logs and error messages)."""
    for secret in sorted(filter(None, secrets), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def secrets_of(settings: Settings) -> list[str]:
    """Values that must never be shown: the URLs with a password, and the signing key."""
    urls = [settings.redis_url, settings.mongo_url, settings.kafka_bootstrap]
    found = [u for u in urls if mask_url(u) != u]
    return [*found, settings.signing_key]


def shown(argv: list[str], template: str, settings: Settings) -> str:
    """What a log line or an error may say of a command: its program and its template."""
    return scrub(f"{argv[0] if argv else '?'} (from the template {template!r})", secrets_of(settings))


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
                "'ssh {host} dm node --env-file - --id {node_id} --cpus {cpus} --memory {memory}'"
            )
        logs = s.home / "nodes"
        env = node_env(s)
        env_file = write_env_file(logs / f"node-{node_id}.env", env)
        values = {"node_id": node_id, "host": host, "cpus": cpus, "memory": memory, "env_file": str(env_file),
                  "redis_url": s.redis_url, "mongo_url": s.mongo_url, "python": sys.executable}  # fmt: skip
        argv = render(s.node_start_command, values, "DM_NODE_START_COMMAND")
        self.exited()
        with open(os.open(logs / f"node-{node_id}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as out:
            try:
                proc = subprocess.Popen(
                    argv, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
                    env={**os.environ, **s.to_env()}, start_new_session=True,
                )  # fmt: skip
            except OSError as exc:
                what = shown(argv, s.node_start_command, s)
                raise ConfigError(f"cannot run DM_NODE_START_COMMAND: {what}: {exc.strerror or exc}") from None
        assert proc.stdin is not None
        try:  # the settings on its stdin, for `dm node --env-file -`; a command that reads none is fine
            proc.stdin.write(env_lines(env))
            proc.stdin.close()
        except OSError:
            pass
        self.running[node_id] = proc
        log.info("node-%s: started %s (pid %s)", node_id, shown(argv, s.node_start_command, s), proc.pid)
        return proc.pid

    def can_stop(self, ctl: Control, node: Doc) -> bool:
        return bool(ctl.settings.node_stop_command)

    def stop(self, ctl: Control, node: Doc) -> bool:
        s = ctl.settings
        if not s.node_stop_command:
            log.warning("node-%s: no DM_NODE_STOP_COMMAND, so it cannot be stopped from here", node["_id"])
            return False
        env_file = s.home / "nodes" / f"node-{node['_id']}.env"
        values = {"node_id": node["_id"], "host": node.get("provider_host") or "", "pid": node.get("pid") or "",
                  "address": node.get("address") or "", "cpus": node.get("cpus"), "memory": node.get("memory"),
                  "env_file": str(env_file), "redis_url": s.redis_url, "mongo_url": s.mongo_url,
                  "python": sys.executable}  # fmt: skip
        argv = render(s.node_stop_command, values, "DM_NODE_STOP_COMMAND")
        what = shown(argv, s.node_stop_command, s)
        try:
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=STOP_TIMEOUT)
        except OSError as exc:
            log.warning("node-%s: stop command %s failed: %s", node["_id"], what, exc.strerror or type(exc).__name__)
            return False
        except subprocess.TimeoutExpired:
            log.warning("node-%s: stop command %s did not end within %gs", node["_id"], what, STOP_TIMEOUT)
            return False
        if done.returncode != 0:
            err = scrub(done.stderr.decode(errors="replace").strip()[-500:], secrets_of(s))
            log.warning("node-%s: stop command %s exited %s: %s", node["_id"], what, done.returncode, err)
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
