"""Typed records that cross a process boundary, each with ``to_dict``/``from_dict``.

Decoding raises :class:`dm.errors.BadRequest` (or a subclass's case) from the cause,
so a malformed message says what is wrong with it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from dm.envconf import parse_duration
from dm.errors import BadRequest
from dm.lifecycle import ACTIVE, FINAL, DeploymentState

#: deployment states, as in DESIGN.md (the enum of dm.lifecycle, whose values are stored)
PENDING = DeploymentState.PENDING
SCHEDULED = DeploymentState.SCHEDULED
RUNNING = DeploymentState.RUNNING
RESTARTING = DeploymentState.RESTARTING
LOST = DeploymentState.LOST
STOPPING = DeploymentState.STOPPING
STOPPED = DeploymentState.STOPPED
SUCCEEDED = DeploymentState.SUCCEEDED
FAILED = DeploymentState.FAILED

STATES = tuple(DeploymentState)
#: states in which a deployment holds (or is about to hold) a node
ACTIVE_STATES = ACTIVE
#: states from which nothing moves on
FINAL_STATES = FINAL

RESTART_POLICIES = ("never", "on-failure", "always")


def _require(data: Any, key: str, kind: type | tuple[type, ...], what: str) -> Any:
    if not isinstance(data, dict):
        raise BadRequest(f"{what} must be a JSON object, got {type(data).__name__}")
    if key not in data:
        raise BadRequest(f"{what} is missing the field {key!r}")
    value = data[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float, (int, float))):
        raise BadRequest(f"{what} field {key!r} has the wrong type ({type(value).__name__})")
    return value


@dataclass(frozen=True)
class Demand:
    """What an algorithm declares it uses: cores and MiB."""

    cpu: float = 0.1
    memory: float = 64.0

    def to_dict(self) -> dict[str, float]:
        return {"cpu": self.cpu, "memory": self.memory}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Demand:
        return cls(cpu=float(data.get("cpu", 0.1)), memory=float(data.get("memory", 64.0)))


@dataclass(frozen=True)
class RestartPolicy:
    """When the node's supervisor starts an exited algorithm again."""

    policy: str = "on-failure"
    max_restarts: int = 5
    backoff: float = 0.5
    backoff_max: float = 30.0

    def delay(self, restarts: int) -> float:
        """Seconds to wait before restart number ``restarts + 1`` (exponential, capped)."""
        return float(min(self.backoff_max, self.backoff * (2**restarts)))

    def should_restart(self, exit_code: int, restarts: int) -> bool:
        if self.policy == "never":
            return False
        if self.policy == "on-failure" and exit_code == 0:
            return False
        return restarts < self.max_restarts

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RestartPolicy:
        return cls(
            policy=str(data.get("policy", "on-failure")),
            max_restarts=int(data.get("max_restarts", 5)),
            backoff=float(data.get("backoff", 0.5)),
            backoff_max=float(data.get("backoff_max", 30.0)),
        )


@dataclass(frozen=True)
class AlgorithmSpec:
    """An algorithm's ``algorithm.toml``, validated."""

    name: str
    version: str
    command: tuple[str, ...]
    demand: Demand = field(default_factory=Demand)
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    env: dict[str, str] = field(default_factory=dict)
    #: names of allowed args (None: any), or a JSON schema (dict with "properties")
    args: tuple[str, ...] | None = None
    args_schema: dict[str, Any] | None = None
    description: str = ""
    #: the ``[limits]`` table: memory (MiB), cpu (cores), cpu_hard_limit, pids; each optional
    limits: dict[str, Any] = field(default_factory=dict)
    #: seconds a node cut off from the control plane keeps it running (``[disconnect] keep_for``)
    keep_for: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "command": list(self.command),
            "demand": self.demand.to_dict(),
            "restart": self.restart.to_dict(),
            "env": dict(self.env),
            "args": list(self.args) if self.args is not None else None,
            "args_schema": self.args_schema,
            "description": self.description,
            "limits": dict(self.limits),
            "disconnect": {"keep_for": self.keep_for},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AlgorithmSpec:
        return cls(
            name=data["name"],
            version=data["version"],
            command=tuple(data["command"]),
            demand=Demand.from_dict(data.get("demand") or {}),
            restart=RestartPolicy.from_dict(data.get("restart") or {}),
            env=dict(data.get("env") or {}),
            args=tuple(data["args"]) if data.get("args") is not None else None,
            args_schema=data.get("args_schema"),
            description=data.get("description", ""),
            limits=dict(data.get("limits") or {}),
            keep_for=float((data.get("disconnect") or {}).get("keep_for") or 0.0),
        )


@dataclass(frozen=True)
class DeployRequest:
    """A request to run an algorithm: from Kafka, the CLI or ``deploy.delay``."""

    algorithm: str
    args: dict[str, Any] = field(default_factory=dict)
    request_id: str | None = None
    version: str | None = None
    #: seconds a cut-off node keeps it running, overriding the algorithm's ``[disconnect] keep_for``
    keep_for: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "algorithm": self.algorithm,
            "version": self.version,
            "args": dict(self.args),
            "keep_for": self.keep_for,
        }

    @classmethod
    def from_dict(cls, data: Any) -> DeployRequest:
        what = "a deploy request"
        algorithm = _require(data, "algorithm", str, what)
        if not algorithm.strip():
            raise BadRequest(f"{what} field 'algorithm' is empty")
        request_id = data.get("request_id")
        if request_id is not None and (not isinstance(request_id, str) or not request_id):
            raise BadRequest(f"{what} field 'request_id' must be a non-empty string")
        version = data.get("version")
        if version is not None and not isinstance(version, str):
            raise BadRequest(f"{what} field 'version' must be a string")
        args = data.get("args", {})
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise BadRequest(f"{what} field 'args' must be a JSON object")
        keep_for = data.get("keep_for")
        if keep_for is not None:
            try:
                keep_for = parse_duration(keep_for)
            except ValueError as exc:
                raise BadRequest(f"{what} field 'keep_for' must be seconds, or like 30s, 5m, 2h: {exc}") from exc
            if not 0 <= keep_for <= 7 * 86400:
                raise BadRequest(f"{what} field 'keep_for' must be from 0 to 7 days, got {keep_for:g} s")
        return cls(algorithm=algorithm, args=args, request_id=request_id, version=version, keep_for=keep_for)


@dataclass(frozen=True)
class MetricsSample:
    """A node's usage, in percent of its declared capacity."""

    node_id: str
    cpu: float
    ram: float
    ts: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MetricsSample:
        try:
            return cls(str(data["node_id"]), float(data["cpu"]), float(data["ram"]), float(data["ts"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise BadRequest(f"malformed metrics sample {data!r}: {exc}") from exc
