"""What crosses Kafka: a request in, a dead letter, an event out. JSON only.

- ``dm.requests``: a JSON object ``{"request_id", "algorithm", "version"?, "args"?}``
  (no other field: a typo such as ``"arg"`` must not run with no args);
  :func:`decode_request` turns its bytes into a :class:`DeployRequest` or raises a
  :class:`Rejected` that says why, including a value MongoDB could not store
  (:mod:`dm.storable`).
- ``dm.requests.dlq``: the original key and bytes, with the reason and where they came
  from in ``dm.*`` headers (:class:`DeadLetter`); a value too large for the producer is
  cut, its full size and sha256 in the headers.
- ``dm.events``: one JSON object per deployment state change, keyed by deployment id
  (:class:`Event`).
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import asdict, dataclass, replace
from typing import Any

from dm.errors import BadRequest, DMError
from dm.models import DeployRequest
from dm.storable import Unstorable, check_storable

#: header names of a dead letter
HEADER_PREFIX = "dm."
#: the fields a request may have (anything else is refused, so a typo is not run without it)
REQUEST_FIELDS = ("request_id", "algorithm", "version", "args", "keep_for")
#: what a record costs beyond its key, value and headers (batch and record framing), with a margin
RECORD_OVERHEAD = 512
#: a reason longer than this is cut (it goes in a header)
MAX_REASON = 2000


class Rejected(DMError):
    """A message the bridge cannot accept; ``code`` says which kind of problem."""

    def __init__(self, reason: str, code: str = BadRequest.code) -> None:
        super().__init__(reason)
        self.code = code

    @classmethod
    def of(cls, exc: DMError) -> Rejected:
        return cls(str(exc), exc.code)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def decode_request(raw: bytes | None, max_bytes: int, max_request_id: int) -> DeployRequest:
    """A request from a message's bytes; raises :class:`Rejected` with the reason."""
    if raw is None or not raw.strip():
        raise Rejected("the message is empty; send a JSON object with request_id and algorithm", "empty")
    if len(raw) > max_bytes:
        raise Rejected(f"the message has {len(raw)} bytes, over the limit of {max_bytes}", "too_large")
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_no_constants, object_pairs_hook=_unique_keys)
    except UnicodeDecodeError as exc:
        raise Rejected(f"the message is not UTF-8 text: {exc}", "not_json") from exc
    except (ValueError, RecursionError) as exc:
        raise Rejected(f"the message is not valid JSON: {exc}", "not_json") from exc
    if not isinstance(data, dict):
        raise Rejected(f"a request must be a JSON object, got {type(data).__name__}", BadRequest.code)
    request_id = data.get("request_id")
    if "request_id" not in data:
        raise Rejected("the request has no 'request_id'; the scheduler must give each request a unique id")
    if not isinstance(request_id, str) or not request_id.strip():
        raise Rejected(f"'request_id' must be a non-empty string, got {request_id!r}")
    if len(request_id) > max_request_id:
        raise Rejected(f"'request_id' has {len(request_id)} characters, over the limit of {max_request_id}")
    unknown = [key for key in data if key not in REQUEST_FIELDS]
    if unknown:
        raise Rejected(unknown_fields(unknown), "unknown_field")
    try:
        check_storable(data)
    except Unstorable as exc:
        raise Rejected(str(exc), "unstorable") from exc
    try:
        return DeployRequest.from_dict(data)
    except BadRequest as exc:
        raise Rejected.of(exc) from exc


def unknown_fields(names: list[str]) -> str:
    """The reason for a request with fields it may not have, with a guess at what was meant."""
    shown = ", ".join(ascii(n) if len(n) <= 64 else ascii(n[:60] + "...") for n in names[:5])
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    guesses = [
        f"{close[0]!a} for {n!a}"
        for n in names[:5]
        if (close := difflib.get_close_matches(n, REQUEST_FIELDS, n=1, cutoff=0.6))
    ]
    hint = f" (did you mean {', '.join(guesses)}?)" if guesses else ""
    return (
        f"the request has unknown field(s) {shown}{more}{hint}; a request has only "
        f"{', '.join(REQUEST_FIELDS)}: put the algorithm's arguments in 'args'"
    )


@dataclass(frozen=True)
class DeadLetter:
    """A rejected message: its original key and bytes, where it was, and why."""

    topic: str
    partition: int
    offset: int
    reason: str
    error: str
    key: bytes | None = None
    value: bytes | None = None
    timestamp: int | None = None

    #: the original value's size and sha256 (hex), set when the value is cut (see :meth:`fitted`)
    size: int | None = None
    sha256: str | None = None

    def headers(self) -> list[tuple[str, bytes]]:
        reason = self.reason if len(self.reason) <= MAX_REASON else self.reason[: MAX_REASON - 3] + "..."
        meta: dict[str, object] = {"reason": reason, "error": self.error, "topic": self.topic}
        meta |= {"partition": self.partition, "offset": self.offset, "timestamp": self.timestamp}
        meta |= {"size": self.size, "sha256": self.sha256}
        # backslashreplace: a reason quoting bad input must still be a header
        present = {k: v for k, v in meta.items() if v is not None}
        return [(HEADER_PREFIX + k, str(v).encode("utf-8", "backslashreplace")) for k, v in present.items()]

    @property
    def truncated(self) -> bool:
        return self.size is not None and self.size != len(self.value or b"")

    def fitted(self, max_bytes: int) -> DeadLetter:
        """This dead letter, with its key and value cut so the record stays under ``max_bytes``
        (the producer's maximum request size): the full size and sha256 of the original value
        go in the ``dm.size`` and ``dm.sha256`` headers, and nothing is sent that the producer
        would refuse (which would hold the partition up for good)."""
        headers = sum(len(k) + len(v) for k, v in self.headers()) + 200  # room for size and sha256
        budget = max_bytes - RECORD_OVERHEAD - headers
        key, value = self.key, self.value
        if len(key or b"") + len(value or b"") <= budget:
            return self
        if key is not None and len(key) > budget // 4:
            key = key[: budget // 4]
        if value is not None:
            digest = hashlib.sha256(value).hexdigest()
            size = len(value)
            value = value[: max(0, budget - len(key or b""))]
            return replace(self, key=key, value=value, size=size, sha256=digest)
        return replace(self, key=key)

    @classmethod
    def from_record(cls, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]) -> DeadLetter:
        """Read a dead letter back from the DLQ (for schedulers and tests)."""
        meta = {k[len(HEADER_PREFIX) :]: v.decode() for k, v in headers if k.startswith(HEADER_PREFIX)}
        try:
            return cls(
                topic=meta["topic"],
                partition=int(meta["partition"]),
                offset=int(meta["offset"]),
                reason=meta["reason"],
                error=meta.get("error", "error"),
                key=key,
                value=value,
                timestamp=int(meta["timestamp"]) if "timestamp" in meta else None,
                size=int(meta["size"]) if "size" in meta else None,
                sha256=meta.get("sha256"),
            )
        except (KeyError, ValueError) as exc:
            raise BadRequest(f"not a dm dead letter: headers {sorted(meta)} ({exc})") from exc


@dataclass(frozen=True)
class Event:
    """One state change of a deployment, as published on the events topic."""

    deployment_id: str
    request_id: str
    algorithm: str
    state: str
    node: str | None
    generation: int
    rev: int
    time: float
    reason: str = ""
    exit_code: int | None = None

    def key(self) -> bytes:
        return self.deployment_id.encode()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def encode(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Event:
        """From a document of the registry's events collection."""
        return cls(
            deployment_id=str(doc["deployment_id"]),
            request_id=str(doc.get("request_id") or ""),
            algorithm=doc.get("algorithm") or "",
            state=doc["state"],
            node=doc.get("node"),
            generation=int(doc["generation"]),
            rev=int(doc["rev"]),
            time=float(doc["time"]),
            reason=doc.get("reason") or "",
            exit_code=doc.get("exit_code"),
        )

    @classmethod
    def from_dict(cls, data: Any) -> Event:
        if not isinstance(data, dict):
            raise BadRequest(f"an event must be a JSON object, got {type(data).__name__}")
        try:
            return cls.from_doc(data)
        except (KeyError, TypeError, ValueError) as exc:
            raise BadRequest(f"malformed event {data!r}: {exc}") from exc

    @classmethod
    def decode(cls, raw: bytes) -> Event:
        try:
            return cls.from_dict(json.loads(raw))
        except ValueError as exc:
            raise BadRequest(f"an event is not JSON: {exc}") from exc
