"""Which errors mean a server is out of reach for now (wait and retry: never give up on the
work, never dead-letter it) and which are permanent (report them, move on)."""

from __future__ import annotations

from pymongo.errors import AutoReconnect, ConnectionFailure, ExecutionTimeout, NetworkTimeout, WTimeoutError
from redis.exceptions import BusyLoadingError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from dm.errors import RegistryUnavailable

#: outages: a retry after a while may succeed
OUTAGES: tuple[type[BaseException], ...] = (
    RegistryUnavailable,
    ConnectionFailure,  # includes AutoReconnect, NetworkTimeout, ServerSelectionTimeoutError
    AutoReconnect,
    NetworkTimeout,
    ExecutionTimeout,
    WTimeoutError,
    RedisConnectionError,
    RedisTimeoutError,
    BusyLoadingError,
    TryAgainError,
    ConnectionError,  # the builtin: a socket refused or reset
    TimeoutError,
)


def is_outage(exc: BaseException) -> bool:
    """True for an error that a retry after a while may cure (a server away or busy)."""
    return isinstance(exc, OUTAGES)
