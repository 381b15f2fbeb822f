"""Fixtures: the real servers of the embedded stack (or DM_* URLs), and a dm system per test."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# never pick up the URLs of a `dm up` the developer has running under ~/.dm
os.environ["DM_HOME"] = tempfile.mkdtemp(prefix="dm-test-home-")
for _name in ("DM_DATABASE",):
    os.environ.pop(_name, None)
# algorithms of the suite write ledgers under tmp_path, which other uids cannot reach:
# they run as the agent's user unless a test asks for uids (tests/test_containment.py)
os.environ.setdefault("DM_UID_RANGE", "off")

from tests.servers import sentinel_redis, stack  # noqa: F401, E402  (fixtures: Redis, MongoDB, Kafka; Sentinels)
from tests.system import System  # noqa: E402


@pytest.fixture
def make_system(stack, tmp_path: Path) -> Iterator:  # noqa: F811
    """``make_system(nodes=1, **settings)``: a started system, stopped by PID after the test."""
    systems: list[System] = []

    def make(nodes: int = 1, control: bool = True, beat: bool = True, **settings: object) -> System:
        system = System(stack.redis_url, stack.mongo_url, tmp_path / f"home{len(systems)}", **settings)
        systems.append(system)
        return system.start(nodes=nodes, control=control, beat=beat)

    yield make
    for system in systems:
        system.stop()
