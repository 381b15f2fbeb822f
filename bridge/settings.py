"""The bridge's settings: a flag, then ``DM_BRIDGE_<FIELD>``, then a default.

The servers come from dm's own settings (``DM_KAFKA_BOOTSTRAP``, ``DM_REDIS_URL``,
``DM_MONGO_URL``, or the stack ``dm up`` recorded). Topic and group names default to
the ones in :mod:`dm.constants`; tests give each run topics and a group of its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from typing import Any

from dm import constants as c
from dm import keys as k
from dm.errors import ConfigError

#: env prefix of every bridge setting
ENV_PREFIX = "DM_BRIDGE_"
#: Redis key of the lease held by the one bridge that publishes events
EVENTS_LOCK = k.EVENTS_LOCK


@dataclass(frozen=True)
class BridgeSettings:
    bootstrap: str = ""
    requests_topic: str = c.REQUESTS_TOPIC
    dlq_topic: str = c.DLQ_TOPIC
    events_topic: str = c.EVENTS_TOPIC
    group: str = c.BRIDGE_GROUP
    #: partitions of the topics the bridge creates when they are missing
    requests_partitions: int = 4
    dlq_partitions: int = 1
    events_partitions: int = 4
    #: a request larger than this (bytes) goes to the DLQ
    max_message_bytes: int = 256 * 1024
    #: a request id longer than this goes to the DLQ
    max_request_id: int = 256
    #: requests read, recorded, enqueued and committed together
    batch_size: int = 500
    poll_seconds: float = 0.5
    #: seconds without a message after which the consumer checks the broker is still there
    probe_seconds: float = 5.0
    #: Tansu answers a JoinGroup after half the session timeout: keep it short
    session_timeout_ms: int = 10000
    heartbeat_interval_ms: int = 2000
    max_poll_interval_ms: int = 300000
    #: seconds a Kafka request or flush may take before the broker counts as gone
    kafka_timeout: float = 10.0
    #: publish deployment events to the events topic (one bridge at a time holds the lease)
    publish_events: bool = True
    events_lock: str = EVENTS_LOCK
    lock_ttl: float = 5.0
    #: events read from the registry per publish round; pause when there are none
    publish_batch: int = 1000
    publish_idle: float = 0.2
    #: retry delays after an outage: doubled from the first up to the cap
    backoff_first: float = 0.5
    backoff_max: float = 30.0
    #: log level of kafka-python itself (its connection errors repeat; ours say what happens)
    kafka_log_level: str = "CRITICAL"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> BridgeSettings:
        """``DM_BRIDGE_<FIELD>`` variables; ``bootstrap`` falls back to dm's ``kafka_bootstrap``."""
        env = dict(os.environ if env is None else env)
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw not in (None, ""):
                values[f.name] = _coerce(f.name, type(getattr(cls, f.name)), raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        if not settings.bootstrap:
            from dm.settings import Settings

            settings = replace(settings, bootstrap=Settings.from_env(env).kafka_bootstrap)
        return settings

    def require_bootstrap(self) -> None:
        if not self.bootstrap:
            raise ConfigError(
                "the bridge has no Kafka broker: set DM_KAFKA_BOOTSTRAP (host:port,...), "
                "or run `dm up`, which starts an embedded broker and the bridge with it"
            )

    @property
    def bootstrap_servers(self) -> list[str]:
        return [s.strip() for s in self.bootstrap.split(",") if s.strip()]


def _coerce(name: str, kind: type, raw: str) -> Any:
    try:
        if kind is bool:
            if raw.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes", "on")
        return kind(raw)
    except ValueError as exc:
        raise ConfigError(f"setting {ENV_PREFIX}{name.upper()}={raw!r} is not a valid {kind.__name__}") from exc
