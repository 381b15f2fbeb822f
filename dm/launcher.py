"""``dm up`` / ``dm down``: the whole local system, each process stopped by its PID.

``dm up`` starts the embedded stack when no server URL is set, then the control
worker, beat, Flower, the Kafka bridge (when a broker is known) and ``min_nodes``
nodes, and records every PID in ``DM_HOME/stack.json`` so ``dm down`` can stop a
detached system.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dm import embedded, fleet, node_manager
from dm.control import Control
from dm.errors import ConfigError, DMError
from dm.settings import Settings, read_stack_state, stack_state_path

Say = Callable[[str], None]


def _spawn(name: str, cmd: list[str], env: dict[str, str], logs: Path) -> subprocess.Popen[bytes]:
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"{name}.log", "ab") as out:
        return subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def up(
    settings: Settings,
    *,
    say: Say = print,
    flower: bool = True,
    flower_address: str = "127.0.0.1",
    flower_port: int = 5555,
    bridge: bool = True,
    nodes: int | None = None,
    beat: bool = True,
) -> dict[str, Any]:
    """Start everything; returns the state recorded in ``stack.json``."""
    home = settings.home
    home.mkdir(parents=True, exist_ok=True)
    existing = read_stack_state(home)
    if existing and any(_alive(pid) for pid in _pids(existing)):
        raise ConfigError(f"dm is already running under {home} (pids in {stack_state_path(home)}); `dm down` first")
    if flower and flower_address not in ("127.0.0.1", "localhost", "::1") and not os.environ.get("DM_FLOWER_AUTH"):
        raise ConfigError(
            f"Flower would listen on {flower_address} without a password: set DM_FLOWER_AUTH=user:password "
            "or keep --flower-address 127.0.0.1"
        )
    state: dict[str, Any] = {"home": str(home), "servers": {}, "processes": {}, "started_at": time.time()}
    stack = None
    try:
        if settings.embedded:
            say(f"starting the embedded stack under {home / 'stack'} ...")
            stack = embedded.EmbeddedStack(home / "stack", kafka=bridge).start(progress=lambda m: say("  " + m))
            settings = settings.with_(
                redis_url=stack.redis_url, mongo_url=stack.mongo_url, kafka_bootstrap=stack.kafka_bootstrap or ""
            )
            state["servers"] = {s.name: s.pid for s in stack.servers}
        state.update(
            redis_url=settings.redis_url, mongo_url=settings.mongo_url, kafka_bootstrap=settings.kafka_bootstrap
        )
        _write(home, state)
        env = {**os.environ, **settings.to_env()}
        ctl = Control(settings)
        ctl.registry.ping()
        ctl.registry.ensure_indexes()
        logs = home / "logs"
        celery = [sys.executable, "-m", "celery", "-A", "dm"]
        procs = {
            "control": celery + ["worker", "-Q", "dm.control", "-P", "threads", "-c", "8",
                                 "-n", "control@%h", "-E", "-l", "INFO"],
        }  # fmt: skip
        if beat:
            procs["beat"] = celery + ["beat", "-S", "celery.beat:Scheduler", "-l", "INFO"]
        if flower:
            procs["flower"] = celery + ["flower", f"--address={flower_address}", f"--port={flower_port}"]
            if os.environ.get("DM_FLOWER_AUTH"):
                procs["flower"].append(f"--basic-auth={os.environ['DM_FLOWER_AUTH']}")
        if bridge and settings.kafka_bootstrap:
            procs["bridge"] = [sys.executable, "-m", "bridge"]
        for name, cmd in procs.items():
            proc = _spawn(name, cmd, env, logs)
            state["processes"][name] = proc.pid
            _write(home, state)
            say(f"  {name} started (pid {proc.pid}, log {logs / (name + '.log')})")
        want = settings.min_nodes if nodes is None else nodes
        live = [n for n in fleet.snapshot(ctl.redis, 0) if n.state in node_manager.LIVE_STATES]
        for _ in range(max(0, want - len(live))):
            node_id = node_manager.add_node(ctl.with_settings(max_nodes=max(settings.max_nodes, want)))
            say(f"  node-{node_id} starting")
        _wait_nodes(ctl, want, say)
        if flower:
            say(f"  flower at http://{flower_address}:{flower_port}")
        say(f"ready: redis {settings.redis_url}, mongo {settings.mongo_url}"
            + (f", kafka {settings.kafka_bootstrap}" if settings.kafka_bootstrap else ""))  # fmt: skip
        return state
    except BaseException:
        down(home, say=lambda _m: None)
        if stack is not None:
            stack.stop()
        raise


def _wait_nodes(ctl: Control, want: int, say: Say, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    seen: set[str] = set()
    while time.monotonic() < deadline:
        up_now = {n.id for n in fleet.snapshot(ctl.redis, 0) if n.state == node_manager.UP}
        for node_id in sorted(up_now - seen):
            say(f"  node-{node_id} up")
        seen |= up_now
        if len(up_now) >= want:
            return
        time.sleep(0.2)
    raise DMError(f"only {len(seen)} of {want} nodes came up within {timeout:g}s; see {ctl.settings.home / 'nodes'}")


def down(home: Path, *, say: Say = print, timeout: float = 15.0) -> bool:
    """Stop every process ``dm up`` started, nodes first; False when nothing was running."""
    state = read_stack_state(home)
    if not state:
        return False
    processes = list(state.get("processes", {}).items())
    # the control plane first, so nothing places the deployments the nodes hand back as they stop
    for name, pid in processes:
        if name != "flower":
            stop_pid(pid, timeout, say, name)
    if state.get("mongo_url"):
        try:
            ctl = Control(Settings.from_env().with_(mongo_url=state["mongo_url"], redis_url=state["redis_url"]))
            here = socket.gethostname()
            nodes = [
                n
                for n in ctl.registry.list_nodes()
                if n.get("pid") and n.get("host") == here and n.get("state") != "stopped"
            ]
        except Exception as exc:  # the registry is gone: stop what we know
            say(f"  cannot list nodes ({exc}); stopping the recorded processes only")
            nodes = []
        for node in nodes:
            stop_pid(node["pid"], timeout, say, f"node-{node['_id']}")
    for name, pid in processes:
        if name == "flower":
            stop_pid(pid, timeout, say, name)
    for name, pid in reversed(list(state.get("servers", {}).items())):
        stop_pid(pid, timeout, say, name)
    stack_state_path(home).unlink(missing_ok=True)
    return True


def stop_pid(pid: int, timeout: float, say: Say, name: str) -> None:
    if embedded.stop_pid(pid, timeout):
        say(f"  {name} (pid {pid}) stopped")


def _alive(pid: int) -> bool:
    return embedded._running(pid)


def _pids(state: dict[str, Any]) -> list[int]:
    return [*state.get("processes", {}).values(), *state.get("servers", {}).values()]


def _write(home: Path, state: dict[str, Any]) -> None:
    tmp = stack_state_path(home).with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(stack_state_path(home))
