"""Test hosts in Linux network namespaces, and servers they reach across their links.

Each test host is a network namespace with one veth link to a bridge on this machine;
the bridge holds the servers' address (the "host side"), and every address comes from
198.18.0.0/15, the range set aside for network tests. Namespaces get no default route,
so their traffic goes only to the bridge and to each other. Cutting a host's link
(``ip link set <veth> down``) is a network partition of that host.

Names are unique per use (``dmt<random>``) so parallel or left-over runs never clash;
``TestNet.remove`` stops every process still inside a namespace by its PID, then deletes
the links, the bridge and the namespaces. It needs root (``ip netns add``).
"""

from __future__ import annotations

import ipaddress
import os
import random
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dm.embedded import Server, start_mongo, start_redis, stop_pid

#: the range set aside for network tests (RFC 2544)
TEST_RANGE = ipaddress.ip_network("198.18.0.0/15")

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None, reason="test hosts need root and iproute2 (ip netns)"
)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


@dataclass(frozen=True)
class TestHost:
    __test__ = False  # not a pytest test class

    #: the namespace
    name: str
    #: the host-side end of its link (down = cut off)
    veth: str
    address: str

    def argv(self, *cmd: str) -> list[str]:
        """``cmd`` run inside this host."""
        return ["ip", "netns", "exec", self.name, *cmd]


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 of the test range that no interface here uses."""
    out = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=True).stdout
    used = [ipaddress.ip_interface(addr).ip for addr in re.findall(r"inet (\S+)", out)]
    subnets = list(TEST_RANGE.subnets(new_prefix=24))
    for subnet in random.sample(subnets, len(subnets)):
        if not any(address in subnet for address in used):
            return subnet  # type: ignore[return-value]
    raise RuntimeError("no free /24 in 198.18.0.0/15")


@dataclass
class TestNet:
    __test__ = False  # not a pytest test class

    count: int
    tag: str = field(default_factory=lambda: "dmt" + uuid.uuid4().hex[:6])
    hosts: list[TestHost] = field(default_factory=list)
    gateway: str = ""

    @property
    def bridge(self) -> str:
        return f"{self.tag}b"

    def create(self) -> TestNet:
        subnet = _free_subnet()
        addresses = list(subnet.hosts())
        self.gateway = str(addresses[0])
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for i in range(1, self.count + 1):
            host = TestHost(f"{self.tag}h{i}", f"{self.tag}v{i}", str(addresses[9 + i]))
            self.hosts.append(host)
            ip("netns", "add", host.name)
            ip("link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", host.name)
            ip("link", "set", host.veth, "master", self.bridge, "up")
            ip("-n", host.name, "addr", "add", f"{host.address}/24", "dev", "eth0")
            ip("-n", host.name, "link", "set", "eth0", "up")
            ip("-n", host.name, "link", "set", "lo", "up")
        return self

    def cut(self, host: TestHost) -> None:
        ip("link", "set", host.veth, "down")

    def heal(self, host: TestHost) -> None:
        ip("link", "set", host.veth, "up")

    def pids(self, host: TestHost) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", host.name], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def remove(self) -> None:
        """Stop what still runs inside, then delete links, bridge and namespaces; never raises."""
        for host in self.hosts:
            for pid in self.pids(host):
                stop_pid(pid, timeout=5)
        for host in self.hosts:
            subprocess.run(["ip", "link", "del", host.veth], capture_output=True)
            subprocess.run(["ip", "netns", "del", host.name], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


@dataclass
class BoundServers:
    """Redis (append-only file) and MongoDB listening on the bridge address, restartable in place."""

    home: Path
    bind: str
    redis: Server | None = None
    mongo: Server | None = None

    def start(self) -> BoundServers:
        self.redis = start_redis(self.home, persistent=True, bind=self.bind)
        self.mongo = start_mongo(self.home, bind=self.bind)
        return self

    @property
    def redis_url(self) -> str:
        assert self.redis is not None
        return self.redis.url

    @property
    def mongo_url(self) -> str:
        assert self.mongo is not None
        return self.mongo.url

    def stop_redis(self) -> None:
        assert self.redis is not None
        self.redis.stop()

    def start_redis(self) -> None:
        assert self.redis is not None
        self.redis = start_redis(self.home, persistent=True, bind=self.bind, port=self.redis.port)

    def stop_mongo(self) -> None:
        assert self.mongo is not None
        self.mongo.stop()

    def start_mongo(self) -> None:
        assert self.mongo is not None
        self.mongo = start_mongo(self.home, bind=self.bind, port=self.mongo.port)

    def stop(self) -> None:
        for server in (self.redis, self.mongo):
            if server is not None:
                server.stop()


@pytest.fixture
def testnet() -> Iterator[TestNet]:
    """Three test hosts; removed after the test, whatever happened."""
    net = TestNet(3)
    try:
        yield net.create()
    finally:
        net.remove()


@pytest.fixture
def bound_servers(testnet: TestNet, tmp_path: Path) -> Iterator[BoundServers]:
    """Redis and MongoDB reachable from the test hosts; stopped by PID after the test."""
    servers = BoundServers(tmp_path / "servers", testnet.gateway)
    try:
        yield servers.start()
    finally:
        servers.stop()


def node_argv(host: TestHost, *args: str) -> list[str]:
    """``python -m workers ARGS`` inside a test host, as ``dm node`` would be run there by hand."""
    return host.argv(sys.executable, "-m", "workers", *args)
