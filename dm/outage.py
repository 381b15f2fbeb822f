"""Which errors are outages (wait and retry) and which are permanent (give up on the item).

The one place that decides it, for the control tasks and the Kafka bridge alike:

- an **outage** is the store's state, not the request's: MongoDB or Redis cannot be
  reached, is electing a primary, shutting down, loading, timing out, or refuses our
  credentials (an operator fixes that; the request must not be lost meanwhile). It is
  retried with backoff and a request is **never** dead-lettered for it;
- anything else is **permanent**: the same request fails the same way every time (a
  value BSON cannot hold, a key MongoDB refuses, a document too large, a server error
  about the data). Retrying it would loop forever; the bridge dead-letters the request
  that causes it, a task fails with the reason.

:data:`TRANSIENT` is the part that a type alone decides (what Celery's ``autoretry_for``
takes); :func:`is_outage` adds server errors that are outages by their code or label.
"""

from __future__ import annotations

from kombu.exceptions import OperationalError as KombuOperationalError
from pymongo.errors import BulkWriteError, ConnectionFailure, OperationFailure, WriteConcernError
from redis import exceptions as redis_errors

from dm.errors import RegistryUnavailable

#: errors that are outages by their type alone
TRANSIENT: tuple[type[BaseException], ...] = (
    RegistryUnavailable,
    # pymongo: AutoReconnect, NetworkTimeout, NotPrimaryError, ServerSelectionTimeoutError, WaitQueueTimeoutError
    ConnectionFailure,
    WriteConcernError,  # the write may or may not have happened: every write of dm is idempotent
    # redis: ConnectionError covers BusyLoadingError, AuthenticationError, MasterNotFoundError
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.ReadOnlyError,  # a replica promoted meanwhile
    redis_errors.TryAgainError,
    redis_errors.ClusterDownError,
    KombuOperationalError,  # kombu's wrapper of a broker connection error
)

#: MongoDB error codes that say something about the server, not about the request
OUTAGE_CODES: frozenset[int] = frozenset(
    {
        6,  # HostUnreachable
        7,  # HostNotFound
        13,  # Unauthorized: an operator fixes the user's roles
        18,  # AuthenticationFailed
        24,  # LockTimeout
        46,  # LockBusy
        50,  # MaxTimeMSExpired
        64,  # WriteConcernFailed
        89,  # NetworkTimeout
        91,  # ShutdownInProgress
        112,  # WriteConflict
        117,  # ConflictingOperationInProgress
        133,  # FailedToSatisfyReadPreference
        134,  # ReadConcernMajorityNotAvailableYet
        189,  # PrimarySteppedDown
        262,  # ExceededTimeLimit
        9001,  # SocketException
        10107,  # NotWritablePrimary
        11600,  # InterruptedAtShutdown
        11601,  # Interrupted
        11602,  # InterruptedDueToReplStateChange
        13435,  # NotPrimaryNoSecondaryOk
        13436,  # NotPrimaryOrSecondary
    }
)
#: error labels MongoDB puts on errors that a retry may get past
OUTAGE_LABELS = ("RetryableWriteError", "TransientTransactionError", "NetworkError")


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` is an outage (retry, never dead-letter) rather than a permanent error."""
    if isinstance(exc, TRANSIENT):
        return True
    if isinstance(exc, BulkWriteError):
        # outage only when no write error is about a document (a duplicate key is one: the caller's to handle)
        details = exc.details or {}
        errors = details.get("writeErrors") or []
        if errors:
            return all(e.get("code") in OUTAGE_CODES for e in errors)
        return bool(details.get("writeConcernErrors"))
    if isinstance(exc, OperationFailure):
        return exc.code in OUTAGE_CODES or any(exc.has_error_label(label) for label in OUTAGE_LABELS)
    return False


def is_permanent(exc: BaseException) -> bool:
    """The same request fails the same way every time: give up on it (the bridge dead-letters it)."""
    return not is_outage(exc)
