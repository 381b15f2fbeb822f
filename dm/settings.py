"""Settings: flag, then ``DM_*`` environment variable, then ``celeryconfig.py``, then default."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from dm import constants as c
from dm.errors import ConfigError


def _home() -> Path:
    return Path(os.environ.get("DM_HOME") or Path.home() / ".dm")


@dataclass(frozen=True)
class Settings:
    redis_url: str = ""
    mongo_url: str = ""
    kafka_bootstrap: str = ""
    #: MongoDB database name
    database: str = "dm"
    home: Path = field(default_factory=_home)
    threshold: float = c.DEFAULT_THRESHOLD
    policy: str = "min"
    lease_ttl: float = c.DEFAULT_LEASE_TTL
    metrics_interval: float = c.DEFAULT_METRICS_INTERVAL
    heartbeat_interval: float = c.DEFAULT_HEARTBEAT_INTERVAL
    start_timeout: float = c.DEFAULT_START_TIMEOUT
    idle_timeout: float = c.DEFAULT_IDLE_TIMEOUT
    reservation_settle: float = c.DEFAULT_RESERVATION_SETTLE
    min_nodes: int = c.DEFAULT_MIN_NODES
    max_nodes: int = c.DEFAULT_MAX_NODES
    node_cpus: float = c.DEFAULT_NODE_CPUS
    node_memory: float = c.DEFAULT_NODE_MEMORY
    provider: str = "local"
    #: provider ``command``: the template that starts a node elsewhere (see dm/providers/command.py)
    node_start_command: str = ""
    #: provider ``command``: the template that stops one
    node_stop_command: str = ""
    #: provider ``command``: the hosts to start nodes on, comma- or space-separated
    node_hosts: str = ""
    #: containment: an algorithm's memory limit is its declared memory times this (unless [limits] memory)
    memory_headroom: float = 1.25
    #: containment: uids (and gids) for deployments when the agent is root, "first-last"; "off":
    #: algorithms run as the agent's user
    uid_range: str = "200000-265535"
    #: containment: one named user for every deployment instead of a uid each (root agents only)
    run_as: str = ""
    #: containment: "" (the best the host allows), "cgroup" (fail if cgroups cannot be used) or "none"
    containment: str = ""
    #: containment: most processes a deployment may have at once (unless [limits] pids)
    pids_limit: int = 1024
    #: containment: where algorithms' work dirs and unpacked packages live when they run under
    #: their own uids (default /var/lib/dm/run/<hash of DM_HOME>); DM_HOME itself stays 0700
    run_dir: str = ""

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``DM_<FIELD>`` variables, then ``celeryconfig.dm_<field>``."""
        env = dict(os.environ if env is None else env)
        values: dict[str, Any] = {}
        config = _celeryconfig()
        for f in fields(cls):
            raw: Any = env.get(f"DM_{f.name.upper()}")
            if raw in (None, ""):
                raw = config.get(f"dm_{f.name}")
            if raw in (None, ""):
                continue
            values[f.name] = _coerce(f.name, f.type, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        if not settings.redis_url or not settings.mongo_url:
            # `dm up` writes the URLs of the stack it started; use them when none are set
            state = read_stack_state(settings.home)
            settings = replace(
                settings,
                redis_url=settings.redis_url or state.get("redis_url", ""),
                mongo_url=settings.mongo_url or state.get("mongo_url", ""),
                kafka_bootstrap=settings.kafka_bootstrap or state.get("kafka_bootstrap") or "",
            )
        return settings

    def to_env(self) -> dict[str, str]:
        """These settings as ``DM_*`` variables, for the processes dm starts."""
        return {f"DM_{f.name.upper()}": str(getattr(self, f.name)) for f in fields(self) if getattr(self, f.name) != ""}

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes)

    @property
    def embedded(self) -> bool:
        """True when no server URL is given, so ``dm up`` starts its own."""
        return not (self.redis_url and self.mongo_url)

    def require_servers(self) -> None:
        if not self.redis_url or not self.mongo_url:
            raise ConfigError(
                "no servers configured: set DM_REDIS_URL and DM_MONGO_URL, "
                "or run `dm up`, which starts an embedded stack and writes them to "
                f"{self.home / 'env'}"
            )


def stack_state_path(home: Path) -> Path:
    return home / "stack.json"


def read_stack_state(home: Path) -> dict[str, Any]:
    """The URLs and PIDs `dm up` recorded, or {} when it is not running here."""
    try:
        data = json.loads(stack_state_path(home).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _coerce(name: str, kind: Any, raw: Any) -> Any:
    kind = str(kind)
    try:
        if "float" in kind:
            return float(raw)
        if "int" in kind:
            return int(raw)
        if "Path" in kind:
            return Path(raw)
        return str(raw)
    except ValueError as exc:
        raise ConfigError(f"setting DM_{name.upper()}={raw!r} is not a valid {kind}") from exc


def _celeryconfig() -> dict[str, Any]:
    try:
        import celeryconfig
    except ImportError:
        return {}
    return {k: getattr(celeryconfig, k) for k in dir(celeryconfig) if k.startswith("dm_")}
