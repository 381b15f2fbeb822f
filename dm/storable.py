"""What MongoDB can store, checked on a request before it is written.

A request's values end up in a deployment document (``args`` one level below the top,
as in the request itself). BSON and the server refuse some values that JSON carries
happily; a batch write with one of them fails for the whole batch. So each request is
checked here first, and one that cannot be stored is dead-lettered with a reason that
names the value, before the write:

- integers outside the 64-bit range (BSON has nothing larger; send big numbers as strings);
- key names with a NUL byte (BSON keys are C strings), starting with ``$`` (operators)
  or holding a ``.`` (paths): older servers refuse those, and queries could not name them;
- strings or keys that are not valid UTF-8 (a lone surrogate escape such as ``"\\ud800"``);
- nesting deeper than :data:`MAX_DEPTH` (MongoDB stores 100 levels; the deployment
  document and the fields dm may put around the args need some of them).
"""

from __future__ import annotations

from typing import Any

#: the 64-bit integer range BSON stores
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
#: the deepest nesting accepted, counting the request object itself as level 1 (MongoDB: 100)
MAX_DEPTH = 90


class Unstorable(ValueError):
    """A value MongoDB cannot store; the message names where it is and what to send instead."""


def check_storable(value: Any) -> None:
    """Raise :class:`Unstorable` if ``value`` (a decoded JSON object) cannot be stored as it is."""
    _walk(value, 1, "")


def _show(path: str) -> str:
    """A path for a reason: ``args.a.b[2]``, its middle cut when it is long."""
    if len(path) > 120:
        return f"{path[:60]}...{path[-40:]}"
    return path or "the request"


def _where(path: str, key: object) -> str:
    return f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else str(key)


def _walk(value: Any, depth: int, path: str) -> None:
    # recursion is bounded: a container deeper than MAX_DEPTH is refused before its children are read
    if isinstance(value, str):
        _check_text(value, _show(path), "string")
    elif isinstance(value, bool) or value is None or isinstance(value, float):
        return
    elif isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            raise Unstorable(
                f"{_show(path)} is {_short(value)}, outside the 64-bit integer range MongoDB stores "
                f"({INT64_MIN} to {INT64_MAX}); send a number this large as a string"
            )
    elif isinstance(value, dict | list):
        if depth > MAX_DEPTH:
            raise Unstorable(
                f"{_show(path)} is nested more than {MAX_DEPTH} levels deep (MongoDB stores at most 100 "
                "with the document around it); flatten the args"
            )
        if isinstance(value, list):
            for i, item in enumerate(value):
                _walk(item, depth + 1, _where(path, i))
            return
        for key, item in value.items():
            _check_key(key, path)
            _walk(item, depth + 1, _where(path, key))
    else:  # not a JSON value: a caller built this request by hand
        raise Unstorable(f"{_show(path)} is a {type(value).__name__}, not a JSON value")


def _check_key(key: object, path: str) -> None:
    if not isinstance(key, str):
        raise Unstorable(f"{_show(path)} has a key {key!r} that is not a string")
    where = f"the key {key!r} in {_show(path)}"
    if "\x00" in key:
        raise Unstorable(f"{where} holds a NUL byte, which MongoDB cannot store in a key name; rename it")
    if key.startswith("$"):
        raise Unstorable(f"{where} starts with '$', which MongoDB keeps for operators; rename it")
    if "." in key:
        raise Unstorable(f"{where} holds a '.', which MongoDB reads as a path; rename it or nest the value")
    _check_text(key, where, "key")


def _check_text(text: str, where: str, what: str) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        char = ascii(text[exc.start])
        raise Unstorable(
            f"{where} holds {char} at position {exc.start}, a lone surrogate that is not valid UTF-8 "
            f"(MongoDB stores UTF-8 only); send the {what} as valid Unicode text"
        ) from exc


def _short(value: int) -> str:
    text = str(value) if value.bit_length() < 4000 else f"a {value.bit_length()}-bit integer"
    return text if len(text) <= 40 else text[:20] + "..." + text[-10:]
