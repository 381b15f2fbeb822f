"""``dm up`` / ``dm down``: the whole local system, each process stopped by its PID.

``dm up`` starts the embedded stack when no server URL is set, then the control
worker, beat, Flower, dm's metrics exporter, the Kafka bridge (when a broker is
known) and ``min_nodes`` nodes, and records every PID in ``DM_HOME/stack.json`` so
``dm down`` can stop a detached system. Flower on a non-loopback address needs
``DM_FLOWER_AUTH``: nothing starts without it.
"""

from __future__ import annotations

import ipaddress
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
from dm.metrics import DEFAULT_PORT as DEFAULT_METRICS_PORT
from dm.settings import Settings, ensure_home, mask_url, read_stack_state, stack_state_path, write_private

Say = Callable[[str], None]

#: ``user:password`` for Flower's basic auth; required when Flower listens beyond loopback
FLOWER_AUTH_VAR = "DM_FLOWER_AUTH"


def spawn(
    name: str, cmd: list[str], env: dict[str, str], logs: Path, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in its own session (our Ctrl-C does not reach it), output to ``logs/<name>.log``."""
    logs.mkdir(parents=True, exist_ok=True)
    fd = os.open(logs / f"{name}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)  # owner alone
    with open(fd, "ab") as out:
        return subprocess.Popen(
            cmd,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
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
    metrics_address: str = "127.0.0.1",
    metrics_port: int | None = DEFAULT_METRICS_PORT,
    sentinel: bool = False,
) -> dict[str, Any]:
    """Start everything; returns the state recorded in ``stack.json``.

    ``metrics_port=None`` starts no metrics exporter; ``sentinel`` makes the embedded Redis a
    primary, a replica and three Sentinels.
    """
    home = settings.home
    existing = read_stack_state(home)
    if existing and any(_alive(pid) for pid in _pids(existing)):
        raise ConfigError(f"dm is already running under {home} (pids in {stack_state_path(home)}); `dm down` first")
    flower_auth = flower_credentials(flower_address) if flower else None
    ensure_home(home)  # 0700: it holds the URLs, the signing key and the logs
    state: dict[str, Any] = {"home": str(home), "servers": {}, "processes": {}, "started_at": time.time()}
    stack = None
    try:
        if settings.embedded:
            say(f"starting the embedded stack under {home / 'stack'} ...")
            stack = embedded.EmbeddedStack(home / "stack", kafka=bridge, sentinel=sentinel)
            stack.start(progress=lambda m: say("  " + m))
            settings = settings.with_(
                redis_url=stack.redis_url, mongo_url=stack.mongo_url, kafka_bootstrap=stack.kafka_bootstrap or ""
            )
            state["servers"] = {s.name: s.pid for s in stack.servers}
        state.update(
            redis_url=settings.redis_url, mongo_url=settings.mongo_url, kafka_bootstrap=settings.kafka_bootstrap
        )
        _write(home, state)
        # the Flower password goes to Flower alone, in its environment (not on a command line `ps` shows)
        env = {k: v for k, v in os.environ.items() if k != FLOWER_AUTH_VAR} | settings.to_env()
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
            # the args column shows dm.run's payload: the deployment id and algorithm
            procs["flower"] = celery + ["flower", f"--address={flower_address}", f"--port={flower_port}",
                                        "--tasks-columns=name,uuid,state,args,received,runtime,worker"]  # fmt: skip
        if metrics_port is not None:
            procs["metrics"] = [sys.executable, "-m", "dm", "metrics",
                                "--address", metrics_address, "--port", str(metrics_port)]  # fmt: skip
        if bridge and settings.kafka_bootstrap:
            procs["bridge"] = [sys.executable, "-m", "bridge"]
        for name, cmd in procs.items():
            own_env = env | {"FLOWER_BASIC_AUTH": flower_auth} if name == "flower" and flower_auth else env
            proc = spawn(name, cmd, own_env, logs)
            state["processes"][name] = proc.pid
            _write(home, state)
            say(f"  {name} started (pid {proc.pid}, log {logs / (name + '.log')})")
        want = settings.min_nodes if nodes is None else nodes
        if not node_manager.provider(settings.provider).starts_nodes:
            say(f"  provider {settings.provider!r} starts no nodes: run `dm node` on each host (docs/multihost.md)")
            want = 0
        live = [n for n in fleet.snapshot(ctl.redis, 0) if n.state in node_manager.LIVE_STATES]
        for _ in range(max(0, want - len(live))):
            node_id = node_manager.add_node(ctl.with_settings(max_nodes=max(settings.max_nodes, want)))
            say(f"  node-{node_id} starting")
        _wait_nodes(ctl, want, say)
        # printed for the operator: a password in a URL never is (mask_url)
        urls = [f"redis {mask_url(settings.redis_url)}", f"mongo {mask_url(settings.mongo_url)}"]
        urls += [f"kafka {mask_url(settings.kafka_bootstrap)}"] if settings.kafka_bootstrap else []
        if flower:
            _wait_port("flower", state["processes"]["flower"], flower_address, flower_port, logs)
            url = f"http://{flower_address}:{flower_port}"
            say(f"  flower at {url} (workers node-<id>@{socket.gethostname()}"
                + (", password required)" if flower_auth else ")"))  # fmt: skip
            urls.append(f"flower {url}")
            state.setdefault("endpoints", {})["flower"] = url
        if metrics_port is not None:
            _wait_port("metrics", state["processes"]["metrics"], metrics_address, metrics_port, logs)
            url = f"http://{metrics_address}:{metrics_port}/metrics"
            say(f"  metrics at {url}")
            urls.append(f"metrics {url}")
            state.setdefault("endpoints", {})["metrics"] = url
        _write(home, state)  # with the endpoints, for `dm status`
        say("ready: " + ", ".join(urls))
        return state
    except BaseException:
        down(home, say=lambda _m: None)
        if stack is not None:
            stack.stop()
        raise


def flower_credentials(address: str) -> str | None:
    """``DM_FLOWER_AUTH`` when set; refuses a non-loopback address without it (Flower has no other guard)."""
    auth = os.environ.get(FLOWER_AUTH_VAR, "")
    if auth and not all(user and password for user, _, password in (p.partition(":") for p in auth.split(","))):
        raise ConfigError(f"{FLOWER_AUTH_VAR} must be user:password (several: a,b comma-separated)")
    if not auth and not is_loopback(address):
        raise ConfigError(
            f"Flower would listen on {address or 'every interface'} without a password: "
            f"set {FLOWER_AUTH_VAR}=user:password, or keep --flower-address 127.0.0.1"
        )
    return auth or None


def is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False  # a host name (or "" for every interface) may resolve to anything


def _wait_port(name: str, pid: int, address: str, port: int, logs: Path, timeout: float = 30.0) -> None:
    """Until the process listens; a clear error when it died first (e.g. the port was taken)."""
    host = "127.0.0.1" if address in ("0.0.0.0", "", "localhost") else ("::1" if address == "::" else address)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            raise DMError(f"{name} exited at start (is port {port} taken?); see {logs / (name + '.log')}")
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise DMError(f"{name} did not listen on {address}:{port} within {timeout:g}s; see {logs / (name + '.log')}")


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
    write_private(stack_state_path(home), json.dumps(state, indent=2))  # 0600: it holds the URLs
