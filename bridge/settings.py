"""The bridge's settings: a flag, then ``DM_BRIDGE_<FIELD>``, then a default.

The servers come from dm's own settings (``DM_KAFKA_BOOTSTRAP``, ``DM_REDIS_URL``,
``DM_MONGO_URL``, or the stack ``dm up`` recorded). Topic and group names default to
the ones in :mod:`dm.constants`; tests give each run topics and a group of its own.

How the bridge authenticates to Kafka (:class:`KafkaSecurity`) comes from
``DM_KAFKA_<FIELD>`` variables, as the broker's address does: ``DM_KAFKA_SECURITY_PROTOCOL``
(``PLAINTEXT``, ``SSL``, ``SASL_PLAINTEXT``, ``SASL_SSL``), ``DM_KAFKA_SASL_MECHANISM``
(``PLAIN``, ``SCRAM-SHA-256``, ``SCRAM-SHA-512``), ``DM_KAFKA_SASL_USERNAME``,
``DM_KAFKA_SASL_PASSWORD`` or ``DM_KAFKA_SASL_PASSWORD_FILE``, ``DM_KAFKA_SSL_CAFILE``,
``DM_KAFKA_SSL_CERTFILE``, ``DM_KAFKA_SSL_KEYFILE``, ``DM_KAFKA_SSL_PASSWORD``,
``DM_KAFKA_SSL_CRLFILE``, ``DM_KAFKA_SSL_CHECK_HOSTNAME``. Passwords are never shown:
not in a repr, a log line or an error message.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dm import constants as c
from dm import keys as k
from dm.envconf import read_fields
from dm.errors import ConfigError

#: env prefix of every bridge setting
ENV_PREFIX = "DM_BRIDGE_"
#: Redis key of the lease held by the one bridge that publishes events
EVENTS_LOCK = k.EVENTS_LOCK
#: env prefix of the Kafka security settings (shared with anything else of dm that talks to Kafka)
KAFKA_PREFIX = "DM_KAFKA_"
PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


@dataclass(frozen=True)
class KafkaSecurity:
    """How the Kafka clients authenticate and encrypt: kafka-python's own settings."""

    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    #: never in a repr or a log line
    sasl_password: str | None = field(default=None, repr=False)
    #: a file holding the password (mode 0600), instead of the variable
    sasl_password_file: str | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_password: str | None = field(default=None, repr=False)
    ssl_crlfile: str | None = None
    ssl_check_hostname: bool = True

    @classmethod
    def from_env(cls, env: dict[str, str]) -> KafkaSecurity:
        security = cls(**read_fields(cls, env, KAFKA_PREFIX))
        security.validate()
        return security

    def validate(self) -> None:
        """Raise :class:`ConfigError` for a combination kafka-python would refuse (or silently ignore)."""
        protocol = self.security_protocol.upper()
        if protocol not in PROTOCOLS:
            shown = f"{KAFKA_PREFIX}SECURITY_PROTOCOL={self.security_protocol!r}"
            raise ConfigError(f"{shown}: use one of {', '.join(PROTOCOLS)}")
        sasl = protocol.startswith("SASL_")
        if sasl:
            mechanism = (self.sasl_mechanism or "").upper()
            if mechanism not in MECHANISMS:
                raise ConfigError(
                    f"{KAFKA_PREFIX}SECURITY_PROTOCOL={protocol} needs {KAFKA_PREFIX}SASL_MECHANISM, "
                    f"one of {', '.join(MECHANISMS)} (got {self.sasl_mechanism!r})"
                )
            if not self.sasl_username or not (self.sasl_password or self.sasl_password_file):
                raise ConfigError(
                    f"{KAFKA_PREFIX}SASL_MECHANISM={mechanism} needs {KAFKA_PREFIX}SASL_USERNAME and "
                    f"{KAFKA_PREFIX}SASL_PASSWORD (or {KAFKA_PREFIX}SASL_PASSWORD_FILE, a file only you can read)"
                )
        elif self.sasl_mechanism or self.sasl_username:
            raise ConfigError(
                f"SASL settings are set but {KAFKA_PREFIX}SECURITY_PROTOCOL is {protocol}: "
                "set it to SASL_SSL (or SASL_PLAINTEXT on a trusted network)"
            )
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_crlfile", "sasl_password_file"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise ConfigError(f"{KAFKA_PREFIX}{name.upper()}={path!r} is not a readable file")

    def password(self) -> str | None:
        if self.sasl_password:
            return self.sasl_password
        if self.sasl_password_file:
            try:
                return Path(self.sasl_password_file).read_text().strip()
            except OSError as exc:
                raise ConfigError(
                    f"cannot read {KAFKA_PREFIX}SASL_PASSWORD_FILE={self.sasl_password_file!r}: {exc.strerror}"
                ) from exc
        return None

    def client_config(self) -> dict[str, Any]:
        """The keyword arguments of kafka-python's clients (consumer, producer, admin)."""
        protocol = self.security_protocol.upper()
        config: dict[str, Any] = {"security_protocol": protocol}
        if protocol.startswith("SASL_"):
            config |= {
                "sasl_mechanism": (self.sasl_mechanism or "").upper(),
                "sasl_plain_username": self.sasl_username,
                "sasl_plain_password": self.password(),
            }
        if protocol in ("SSL", "SASL_SSL"):
            config["ssl_check_hostname"] = self.ssl_check_hostname
            for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_password", "ssl_crlfile"):
                if getattr(self, name):
                    config[name] = getattr(self, name)
        return config

    def describe(self) -> str:
        """For a log line: the protocol, mechanism and user, never a password."""
        protocol = self.security_protocol.upper()
        if protocol.startswith("SASL_"):
            return f"{protocol} ({(self.sasl_mechanism or '').upper()} as {self.sasl_username})"
        return protocol


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
    #: the producer's largest record (kafka-python's max_request_size; keep it at or under the
    #: broker's message.max.bytes): a dead letter is cut to fit it
    max_request_size: int = 1024 * 1024
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
    #: how the clients authenticate and encrypt (``DM_KAFKA_*``, see the module)
    security: KafkaSecurity = field(default_factory=KafkaSecurity)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> BridgeSettings:
        """``DM_BRIDGE_<FIELD>`` variables; ``bootstrap`` falls back to dm's ``kafka_bootstrap``."""
        env = dict(os.environ if env is None else env)
        values: dict[str, Any] = {
            "security": KafkaSecurity.from_env(env),
            **read_fields(cls, env, ENV_PREFIX, skip=("security",)),
        }
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
