"""Unit tests: the domain's rules against the in-memory ports (dm.adapters.memory), no server."""

from __future__ import annotations

import pytest

from dm.adapters.memory import MemoryPorts, memory_ports


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/unit/" in str(item.fspath):
            item.add_marker(pytest.mark.unit)


@pytest.fixture
def ports() -> MemoryPorts:
    """Two up nodes of 1 cpu / 1024 MiB, an algorithm ``hello`` (0.1 cpu, 64 MiB), ``big`` (0.5, 512)."""
    p = memory_ports(max_nodes=4, min_nodes=1, lease_ttl=3.0, heartbeat_interval=0.5, start_timeout=30.0)
    p.add_node("1")
    p.add_node("2")
    p.catalogue.add("hello")
    p.catalogue.add("big", cpu=0.5, memory=512)
    return p
