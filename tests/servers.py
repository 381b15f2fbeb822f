"""Fixtures that give tests real servers: import them into conftest.py.

``stack`` (session): Redis, MongoDB and Kafka for the whole run. When DM_REDIS_URL,
DM_MONGO_URL and DM_KAFKA_BOOTSTRAP are all set it uses those servers and starts
nothing; otherwise it starts the embedded stack (dm.embedded) on free loopback ports in
a temporary directory and stops every server by its PID at the end.

``stack_factory`` (function): starts private stacks (no Kafka unless asked) for tests
that kill, restart or break a server, and stops them after the test.

``sentinel_redis`` (function): a Redis primary, a replica and three Sentinels (the
embedded topology, dm.embedded) for one test; ``.url`` is its ``sentinel://`` URL.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dm import embedded
from dm.embedded import EmbeddedStack, Server

#: the variables that point the tests at external servers instead
ENV_VARS = ("DM_REDIS_URL", "DM_MONGO_URL", "DM_KAFKA_BOOTSTRAP")


@dataclass(frozen=True)
class StackInfo:
    """Where the test servers are; `embedded` is None when they are external."""

    redis_url: str
    mongo_url: str
    kafka_bootstrap: str | None
    embedded: EmbeddedStack | None = None

    def env(self) -> dict[str, str]:
        """The DM_* variables for a dm process (a worker, a node) started by a test."""
        env = {"DM_REDIS_URL": self.redis_url, "DM_MONGO_URL": self.mongo_url}
        return env | ({"DM_KAFKA_BOOTSTRAP": self.kafka_bootstrap} if self.kafka_bootstrap else {})


def external_stack() -> StackInfo | None:
    """The servers named by the DM_* variables, when all of them are set."""
    if not all(os.environ.get(name) for name in ENV_VARS):
        return None
    return StackInfo(os.environ["DM_REDIS_URL"], os.environ["DM_MONGO_URL"], os.environ["DM_KAFKA_BOOTSTRAP"])


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackInfo]:
    """Redis, MongoDB and Kafka for the whole test session."""
    external = external_stack()
    if external is not None:
        yield external
        return
    embedded = EmbeddedStack(tmp_path_factory.mktemp("dm-stack"), kafka=True).start()
    try:
        yield StackInfo(embedded.redis_url, embedded.mongo_url, embedded.kafka_bootstrap, embedded)
    finally:
        embedded.stop()


@pytest.fixture
def stack_factory(tmp_path: Path) -> Iterator[Callable[..., EmbeddedStack]]:
    """``make(kafka=False, persistent_redis=False)`` starts a private stack for one test."""
    started: list[EmbeddedStack] = []

    def make(*, kafka: bool = False, persistent_redis: bool = False) -> EmbeddedStack:
        home = tmp_path / f"stack{len(started)}"
        started.append(EmbeddedStack(home, kafka=kafka, persistent_redis=persistent_redis))
        return started[-1].start()

    try:
        yield make
    finally:
        for one in reversed(started):
            one.stop()


@dataclass
class SentinelTopology:
    """A primary, a replica and the Sentinels watching them; every process stopped by PID."""

    servers: list[Server]

    @property
    def sentinels(self) -> list[Server]:
        return [s for s in self.servers if s.name.startswith("sentinel-")]

    @property
    def url(self) -> str:
        return embedded.sentinel_url(self.sentinels)

    def master(self) -> Server | None:
        """The server the Sentinels call the master now."""
        address = embedded.sentinel_master(self.sentinels)
        return next((s for s in self.servers if address and s.port == address[1]), None)

    def stop(self) -> None:
        while self.servers:
            self.servers.pop().stop()


@pytest.fixture
def sentinel_redis(tmp_path: Path) -> Iterator[SentinelTopology]:
    """A primary, a replica and three Sentinels on free loopback ports, for one test."""
    topology = SentinelTopology(embedded.start_sentinel_topology(tmp_path / "sentinel"))
    try:
        yield topology
    finally:
        topology.stop()
