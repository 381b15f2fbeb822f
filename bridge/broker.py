"""Kafka clients set up to work on Tansu as on Kafka, the bridge's topics, and waiting out outages.

What Tansu (the embedded broker) needs, found by trying (see docs/kafka.md):

- it answers a JoinGroup only after half the member's session timeout, so with
  kafka-python's default (45 s) a new consumer gets nothing for ~23 s: keep
  ``session_timeout_ms`` short (10 s here: partitions within ~5 s);
- its ListOffsets for ``latest`` is wrong: start from ``earliest`` and rely on
  committed offsets, never on end offsets;
- it keeps topics in memory and auto-creates unknown ones with its own defaults, so
  the bridge creates its topics itself, again after every outage, and turns
  auto-creation off.

Every client gets the same security settings (SASL, TLS: :class:`bridge.settings.KafkaSecurity`).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from contextlib import closing, suppress
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError, TopicAlreadyExistsError

from bridge.settings import BridgeSettings
from dm.backoff import Backoff as Backoff  # one retry delay for every loop (dm/backoff.py)

log = logging.getLogger("dm.bridge")

#: what a broker outage looks like to the clients
KAFKA_OUTAGES: tuple[type[BaseException], ...] = (KafkaError, OSError)


def _common(s: BridgeSettings) -> dict[str, Any]:
    timeout_ms = int(s.kafka_timeout * 1000)
    return {
        "bootstrap_servers": s.bootstrap_servers,
        "request_timeout_ms": timeout_ms,
        "bootstrap_timeout_ms": timeout_ms,
        "reconnect_backoff_max_ms": int(s.backoff_max * 1000),
        **s.security.client_config(),
    }


def admin(s: BridgeSettings) -> KafkaAdminClient:
    return KafkaAdminClient(client_id="dm-bridge-admin", **_common(s))


def consumer_config(s: BridgeSettings) -> dict[str, Any]:
    """The bridge's consumer: in its group, committing by hand."""
    return {
        "group_id": s.group,
        "client_id": "dm-bridge",
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "allow_auto_create_topics": False,
        "max_poll_records": s.batch_size,
        "session_timeout_ms": s.session_timeout_ms,
        "heartbeat_interval_ms": s.heartbeat_interval_ms,
        "max_poll_interval_ms": s.max_poll_interval_ms,
        **_common(s),
    }


def producer_config(s: BridgeSettings) -> dict[str, Any]:
    """An idempotent producer (acks=all): a retry never reorders or doubles a partition's records."""
    return {
        "client_id": "dm-bridge",
        "acks": "all",
        "linger_ms": 5,
        "allow_auto_create_topics": False,
        "max_block_ms": int(s.kafka_timeout * 1000),
        "delivery_timeout_ms": int(s.kafka_timeout * 3000),
        "max_request_size": s.max_request_size,
        **_common(s),
    }


def consumer(s: BridgeSettings, listener: Any = None) -> KafkaConsumer:
    """A consumer (:func:`consumer_config`) subscribed to the requests topic."""
    c = KafkaConsumer(**consumer_config(s))
    c.subscribe([s.requests_topic], listener=listener)
    return c


def producer(s: BridgeSettings) -> KafkaProducer:
    return KafkaProducer(**producer_config(s))


def ensure_topics(s: BridgeSettings) -> list[str]:
    """Create the bridge's topics that are missing; returns the ones it created."""
    wanted = {s.requests_topic: s.requests_partitions, s.dlq_topic: s.dlq_partitions}
    wanted[s.events_topic] = s.events_partitions
    with closing(admin(s)) as client:
        missing = {name: n for name, n in wanted.items() if name not in set(client.list_topics())}
        created = []
        for name, partitions in missing.items():
            with suppress(TopicAlreadyExistsError):  # another bridge was first
                client.create_topics({name: {"num_partitions": partitions, "replication_factor": -1}})
                created.append(name)
    return created


def reachable(s: BridgeSettings, timeout: float = 2.0) -> bool:
    """Whether any bootstrap server accepts a TCP connection (cheap, and says nothing more)."""
    for server in s.bootstrap_servers:
        host, _, port = server.rpartition(":")
        try:
            socket.create_connection((host.strip("[]") or "localhost", int(port)), timeout=timeout).close()
            return True
        except (OSError, ValueError):
            continue
    return False


def connect(s: BridgeSettings, stop: threading.Event, who: str) -> bool:
    """Wait until the broker answers and the topics exist; False when asked to stop first.

    Logs one line per failed attempt, with the next delay (doubling up to ``backoff_max``).
    """
    backoff = Backoff(s.backoff_first, s.backoff_max)
    while not stop.is_set():
        try:
            created = ensure_topics(s)
        except KAFKA_OUTAGES as exc:
            delay = backoff.next()
            why = describe(exc)
            log.warning("%s: Kafka at %s is not reachable (%s); retrying in %.1fs", who, s.bootstrap, why, delay)
            stop.wait(delay)
            continue
        if created:
            log.info("%s: created topic(s) %s", who, ", ".join(created))
        if backoff.failures:
            log.info("%s: Kafka at %s is reachable again", who, s.bootstrap)
        return True
    return False


def describe(exc: BaseException, limit: int = 240) -> str:
    """An error in one short line: its type and the start of its message."""
    name, text = type(exc).__name__, " ".join(str(exc).split())
    text = text if text.startswith(name) else f"{name}: {text}" if text else name
    return text if len(text) <= limit else text[: limit - 3] + "..."


def quietly(close: Callable[[], Any]) -> None:
    """Close a client that may be half broken; an outage must not stop a shutdown."""
    try:
        close()
    except Exception as exc:
        log.debug("closing a Kafka client: %s", exc)
