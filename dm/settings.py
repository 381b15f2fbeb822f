"""Settings: flag, then ``DM_*`` environment variable, then ``celeryconfig.py``, then default.

Also the one helper that keeps passwords out of what dm prints and logs: :func:`mask_url`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from dm import constants as c
from dm.envconf import read_fields
from dm.errors import ConfigError

#: seconds finished deployments, dead nodes and node files are kept (DM_RETENTION): 7 days
DEFAULT_RETENTION = 7 * 86400.0
#: seconds between two retention sweeps (beat) and two housekeeping rounds on a node
RETENTION_INTERVAL = 60.0
#: bytes an algorithm's log grows to before it is rotated, and the rotated files kept
DEFAULT_LOG_MAX_SIZE = 10 * 1024 * 1024
DEFAULT_LOG_KEEP = 3


def _home() -> Path:
    return Path(os.environ.get("DM_HOME") or Path.home() / ".dm")


#: settings that are durations (``7d``, ``30m``, or seconds)
DURATIONS = ("retention", "retention_interval")


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
    #: the key that signs run and kill orders (dm/signing.py); empty: DM_HOME/signing.key
    signing_key: str = field(default="", repr=False)
    #: seconds finished deployments, their events, dead nodes and node files are kept
    #: (DM_RETENTION takes seconds or a number with s, m, h or d: "7d")
    retention: float = DEFAULT_RETENTION
    #: seconds between two retention sweeps (beat) and two pruning rounds on a node
    retention_interval: float = RETENTION_INTERVAL
    #: bytes an algorithm's log may grow to before it is rotated (per algorithm: ``[logs] max_size``)
    log_max_size: int = DEFAULT_LOG_MAX_SIZE
    #: rotated logs kept beside the current one (per algorithm: ``[logs] keep``)
    log_keep: int = DEFAULT_LOG_KEEP
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
        config = _celeryconfig()
        values = read_fields(cls, env, "DM_", fallback=lambda name: config.get(f"dm_{name}"), durations=DURATIONS)
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

    def __repr__(self) -> str:  # the dataclass's own would show passwords in URLs and the signing key
        shown = {f.name: getattr(self, f.name) for f in fields(self) if f.repr}
        shown.update({k: mask_url(v) for k, v in shown.items() if k.endswith(("_url", "_bootstrap"))})
        return f"Settings({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

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


def ensure_home(home: Path) -> Path:
    """Make ``home`` (DM_HOME) if needed, readable by its owner alone (0700): it holds the
    stack's URLs, the signing key and the logs."""
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    if home.stat().st_uid == os.getuid():
        home.chmod(0o700)
    return home


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, readable by its owner alone (0600 from the start)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def stack_state_path(home: Path) -> Path:
    return home / "stack.json"


def read_stack_state(home: Path) -> dict[str, Any]:
    """The URLs and PIDs `dm up` recorded, or {} when it is not running here."""
    try:
        data = json.loads(stack_state_path(home).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (``redis://:***@host:6379/0``), for
    anything dm prints or logs; a URL without a password is returned as it is. Several
    comma-separated URLs (Kafka bootstrap lists, MongoDB seed lists) are masked each."""
    if not url or ("@" not in url and "password" not in url.lower()):
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return re.sub(r"//([^:/@]*):[^@]*@", r"//\1:***@", url)
    if "@" not in parts.netloc:
        return urlunsplit(parts._replace(query=_mask_query(parts.query)))
    userinfo, _, hosts = parts.netloc.rpartition("@")
    user, colon, _password = userinfo.partition(":")
    # a lone userinfo is a user name to MongoDB (x.509), but may be a password elsewhere
    masked = f"{user}:***" if colon else (userinfo if parts.scheme.startswith("mongodb") else "***")
    return urlunsplit((parts.scheme, f"{masked}@{hosts}", parts.path, _mask_query(parts.query), parts.fragment))


def _mask_query(query: str) -> str:
    """Passwords passed as query options (``?password=...``, ``tlsCertificateKeyFilePassword``)."""
    return re.sub(r"((?:^|&)[^=&]*password[^=&]*=)[^&]*", r"\1***", query, flags=re.IGNORECASE)


def _celeryconfig() -> dict[str, Any]:
    try:
        import celeryconfig
    except ImportError:
        return {}
    return {k: getattr(celeryconfig, k) for k in dir(celeryconfig) if k.startswith("dm_")}
