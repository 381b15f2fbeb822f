"""A dm system for one test: control worker, beat and nodes as real processes against the
test stack, each in a fresh database and Redis state, every process stopped by its PID."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from dm import fleet, node_manager, redis_conn
from dm.control import Control
from dm.embedded import stop_pid
from dm.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "algorithms"


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie does not count)."""
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (ProcessLookupError, OSError):
        return False


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.1, what: str = "") -> Any:
    """Poll until ``predicate()`` is truthy; fail with ``what`` and the last value otherwise."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what or predicate}; last value: {value!r}")


def forget_connections() -> None:
    """Make this process's Celery app connect anew: a test may bring servers at new addresses,
    and the app keeps its connection pool and result backend across tests."""
    from dm.app import app

    app._after_fork()  # drops the connection and producer pools
    app._backend_cache = None
    app._local.__dict__.pop("backend", None)


class System:
    def __init__(self, redis_url: str, mongo_url: str, home: Path, **settings: Any) -> None:
        self.home = home
        self.database = "dm_" + uuid.uuid4().hex[:10]
        self.env_settings = {f"DM_{k.upper()}": str(v) for k, v in settings.items()}
        self.env = dict(
            os.environ,
            DM_REDIS_URL=redis_url,
            DM_MONGO_URL=mongo_url,
            DM_DATABASE=self.database,
            DM_HOME=str(home),
            PYTHONPATH=str(ROOT),
            **self.env_settings,
        )
        self.settings = Settings.from_env(self.env)
        self.ctl = Control(self.settings)
        try:
            self.ctl.redis.flushdb()
        except redis.exceptions.NoPermissionError:
            pass  # a user of dm's own (tests/test_redis_acl.py) may not flush: its Redis is new

        self.ctl.registry.ensure_indexes()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs = home / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        # this test process sends tasks with the same settings as the workers
        from dm.app import app

        if app.conf.broker_url != redis_conn.broker_url(redis_url):
            forget_connections()
        redis_conn.configure_celery(app.conf, redis_url)
        import dm.control

        dm.control._control = self.ctl

    # -- processes --------------------------------------------------------------

    def spawn(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        from dm.launcher import spawn

        proc = spawn(name, cmd, self.env, self.logs, cwd=ROOT)
        self.procs[name] = proc
        return proc

    def start_control(self, name: str = "control") -> subprocess.Popen[bytes]:
        return self.spawn(
            name,
            [sys.executable, "-m", "celery", "-A", "dm", "worker", "-Q", "dm.control", "-P", "threads", "-c", "8",
             "-n", f"{name}-{uuid.uuid4().hex[:6]}@%h", "--without-gossip", "--without-mingle", "-l", "INFO"],
        )  # fmt: skip

    def start_beat(self, name: str = "beat") -> subprocess.Popen[bytes]:
        return self.spawn(name, [sys.executable, "-m", "celery", "-A", "dm", "beat", "-S", "celery.beat:Scheduler",
                                 "-l", "INFO"])  # fmt: skip

    def start(self, nodes: int = 1, control: bool = True, beat: bool = True) -> System:
        if control:
            self.start_control()
        if beat:
            self.start_beat()
        for _ in range(nodes):
            self.add_node()
        if nodes:
            self.wait_nodes_up(nodes)
        return self

    def add_node(self) -> str:
        node_id = node_manager.add_node(self.ctl.with_settings(max_nodes=100))
        assert node_id is not None
        return node_id

    def wait_nodes_up(self, count: int, timeout: float = 60.0) -> list[str]:
        return wait_for(
            lambda: (
                (ids := [n.id for n in fleet.snapshot(self.ctl.redis, 0) if n.state == "up"])
                and len(ids) >= count
                and ids
            ),
            timeout,
            what=f"{count} nodes up",
        )

    def node_pid(self, node_id: str) -> int:
        doc = self.ctl.registry.get_node(node_id)
        assert doc is not None and doc.get("pid"), f"node {node_id} has no pid"
        return int(doc["pid"])

    def stop(self) -> None:
        for proc in self.procs.values():  # control plane first: nothing re-places what nodes hand back
            stop_pid(proc.pid, 10)
        for node in self.ctl.registry.list_nodes():
            if node.get("pid"):
                stop_pid(int(node["pid"]), 10)
        self.ctl.registry.db.client.drop_database(self.database)

    # -- helpers ----------------------------------------------------------------

    def add_examples(self, *names: str) -> None:

        for name in names or [p.name for p in EXAMPLES.iterdir() if (p / "algorithm.toml").exists()]:
            self.add_algorithm(EXAMPLES / name)

    def add_algorithm(self, directory: Path) -> dict[str, Any]:
        from dm.package import load_spec, pack

        archive, sha = pack(directory)
        return self.ctl.registry.add_algorithm(load_spec(directory), archive, sha)

    def deploy(self, algorithm: str, timeout: float = 30.0, **kwargs: Any) -> dict[str, Any]:
        from celery.exceptions import TimeoutError as CeleryTimeout

        from dm import deploy

        result = deploy.delay(algorithm, **kwargs)
        try:
            return result.get(timeout=timeout)
        except CeleryTimeout:
            # what the backend holds for it, and what the processes said meanwhile
            raise AssertionError(
                f"no answer to deploy {algorithm!r} in {timeout:g}s (task {result.id}: "
                f"{result.backend.get_task_meta(result.id)})\n{self.log_tails()}"
            ) from None

    def deployment(self, dep_id: str) -> dict[str, Any]:
        doc = self.ctl.registry.get_deployment(dep_id)
        return {"id": doc["_id"], **doc}

    def wait_state(self, dep_id: str, *states: str, timeout: float = 30.0) -> dict[str, Any]:
        return wait_for(
            lambda: (d := self.deployment(dep_id))["state"] in states and d,
            timeout,
            what=f"deployment {dep_id} in {states}",
        )

    def wait_all_succeeded(self, count: int, timeout: float = 60.0) -> None:
        """Wait until ``count`` deployments (all there are) succeeded; on a timeout, the error
        shows the others, their history and the tail of each process's log."""
        states: dict[str, int] = {}

        def done() -> bool:
            states.clear()
            for doc in self.ctl.registry.deployments.find({}, {"state": 1}):
                states[doc["state"]] = states.get(doc["state"], 0) + 1
            return states.get("succeeded") == count

        try:
            wait_for(done, timeout, what=f"{count} deployments succeeded")
        except AssertionError as exc:
            stuck = list(self.ctl.registry.deployments.find({"state": {"$ne": "succeeded"}}))
            raise AssertionError(f"{exc}; their states: {states}\nthe others: {stuck}\n{self.log_tails()}") from None
        assert sum(states.values()) == count, f"more deployments than {count}: {states}"

    def log_tails(self, size: int = 4000) -> str:
        """The end of each process's log (the control plane's, beat's, each node's)."""
        paths = [*sorted(self.logs.glob("*.log")), *sorted((self.home / "nodes").glob("*.log"))]
        return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-size:]}" for p in paths)

    def dm(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run the CLI as a user would."""
        return subprocess.run(
            [sys.executable, "-m", "dm", *args], cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout
        )
