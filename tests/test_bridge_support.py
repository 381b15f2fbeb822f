"""Helpers of the bridge tests (no tests here): bridges as processes, and Kafka read and written.

``bridges(system)`` (a fixture) gives a :class:`Bridges`: topics and a group of its own
on the test broker, ``python -m bridge`` processes started with the system's env and
stopped by PID after the test, and helpers to send requests and read the DLQ and events.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition

from bridge.messages import DeadLetter, Event
from dm.embedded import stop_pid
from tests.system import ROOT, System, wait_for

#: quick group joins on Tansu (it answers a JoinGroup after half the session timeout)
FAST = {"SESSION_TIMEOUT_MS": "6000", "HEARTBEAT_INTERVAL_MS": "1000", "LOCK_TTL": "3", "BACKOFF_MAX": "2"}


class Bridges:
    def __init__(self, system: System, bootstrap: str, **settings: object) -> None:
        self.system, self.bootstrap = system, bootstrap
        tag = uuid.uuid4().hex[:8]
        self.requests, self.dlq, self.events = f"req.{tag}", f"dlq.{tag}", f"events.{tag}"
        self.group = f"bridge-{tag}"
        names = {"REQUESTS_TOPIC": self.requests, "DLQ_TOPIC": self.dlq, "EVENTS_TOPIC": self.events}
        names |= {"GROUP": self.group, **FAST, **{k.upper(): str(v) for k, v in settings.items()}}
        self.env = {**system.env, "DM_KAFKA_BOOTSTRAP": bootstrap} | {f"DM_BRIDGE_{k}": v for k, v in names.items()}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._producer: KafkaProducer | None = None

    # -- processes --------------------------------------------------------------

    def start(self, name: str = "bridge") -> subprocess.Popen[bytes]:
        with open(self.system.logs / f"{name}.log", "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "bridge"], cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.procs[name] = proc
        return proc

    def kill(self, name: str) -> None:
        """``kill -9``: no goodbye, no commit, no lease released."""
        proc = self.procs[name]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def stop(self) -> None:
        for proc in self.procs.values():
            stop_pid(proc.pid, 15)
            proc.poll()
        if self._producer is not None:
            self._producer.close()
            self._producer = None

    def log(self, name: str = "bridge") -> str:
        path = self.system.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_log(self, text: str, name: str = "bridge", timeout: float = 30.0, count: int = 1) -> None:
        wait_for(lambda: self.log(name).count(text) >= count, timeout, what=f"{text!r} x{count} in the {name} log")

    def wait_assigned(self, name: str = "bridge", timeout: float = 30.0) -> None:
        self.wait_log(f"partitions assigned: {self.requests}[", name, timeout)

    # -- Kafka ------------------------------------------------------------------

    @property
    def producer(self) -> KafkaProducer:
        if self._producer is None:
            self._producer = KafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=5)
        return self._producer

    def send(self, messages: list[Any], keyed: bool = True) -> list[Any]:
        """Send requests (dicts as JSON; bytes or None as they are); returns each one's metadata."""
        futures = []
        for message in messages:
            key = str(message.get("request_id")).encode() if keyed and isinstance(message, dict) else None
            futures.append(self.producer.send(self.requests, key=key, value=self.encode(message)))
        self.producer.flush()
        return [f.get(timeout=10) for f in futures]

    def forget_producer(self) -> None:
        """After a broker restart: the old producer's id means nothing to the new broker."""
        if self._producer is not None:
            self._producer.close(timeout=0)
            self._producer = None

    @staticmethod
    def encode(message: Any) -> bytes | None:
        return json.dumps(message).encode() if isinstance(message, dict) else message

    def read(self, topic: str, until: Callable[[list[Any]], bool], timeout: float = 60.0) -> list[Any]:
        return read(self.bootstrap, topic, until, timeout)

    def read_events(self, until: Callable[[list[Event]], bool], timeout: float = 60.0) -> list[tuple[Any, Event]]:
        return read_events(self.bootstrap, self.events, until, timeout)

    def read_dead_letters(self, count: int, timeout: float = 60.0) -> list[DeadLetter]:
        records = self.read(self.dlq, lambda rs: len(rs) >= count, timeout)
        return [DeadLetter.from_record(r.key, r.value, r.headers) for r in records]

    def committed(self) -> int:
        """How many requests the group has committed, over all partitions."""
        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap)
        try:
            offsets = admin.list_group_offsets(self.group).get(self.group) or {}
        finally:
            admin.close()
        return sum(meta.offset for meta in offsets.values() if meta.offset > 0)


def read(bootstrap: str, topic: str, until: Callable[[list[Any]], bool], timeout: float = 60.0) -> list[Any]:
    """Every record of ``topic`` from the start, once ``until(records)`` holds."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    records: list[Any] = []
    try:
        partitions = wait_for(lambda: consumer.partitions_for_topic(topic), 30, what=f"topic {topic}")
        consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
        consumer.seek_to_beginning()
        deadline = time.monotonic() + timeout
        while not until(records):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out reading {topic}: {len(records)} records")
            for batch in consumer.poll(timeout_ms=200).values():
                records.extend(batch)
    finally:
        consumer.close()
    return records


def read_events(
    bootstrap: str, topic: str, until: Callable[[list[Event]], bool], timeout: float = 60.0
) -> list[tuple[Any, Event]]:
    """(record, event) pairs of an events topic, in each partition's order, once ``until(events)`` holds."""
    decoded: list[tuple[Any, Event]] = []

    def done(records: list[Any]) -> bool:
        decoded[:] = [(r, Event.decode(r.value)) for r in records]
        return until([e for _, e in decoded])

    read(bootstrap, topic, done, timeout)
    return decoded


@pytest.fixture
def bridges(stack: Any) -> Iterator[Callable[..., Bridges]]:
    """``bridges(system, bootstrap=None, **settings)``: stopped by PID after the test."""
    made: list[Bridges] = []

    def make(system: System, bootstrap: str | None = None, **settings: object) -> Bridges:
        made.append(Bridges(system, bootstrap or stack.kafka_bootstrap, **settings))
        return made[-1]

    yield make
    for one in made:
        one.stop()
