"""Reading settings from the environment: one way for dm's settings (``DM_*``), the
bridge's (``DM_BRIDGE_*``, ``DM_KAFKA_*``) and Celery's overrides (``CELERY_*``).

A value is read by the type of its field's default: a boolean is the word (``1``, ``true``,
``yes``, ``on`` or their opposites; ``bool("False")`` would be True), numbers and paths are
parsed, a duration may say ``30s``, ``5m``, ``2h`` or ``7d``. A bad value is a
:class:`dm.errors.ConfigError` that names the variable (and hides it when it is a secret).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from dm.errors import ConfigError

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")
#: names whose values are never shown in an error
SECRET_WORDS = ("password", "key", "secret", "token")
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_bool(raw: str) -> bool:
    word = raw.strip().lower()
    if word not in TRUE + FALSE:
        raise ValueError(raw)
    return word in TRUE


def parse_duration(raw: Any) -> float:
    """Seconds from a number or a string like ``"90"``, ``"30m"``, ``"7d"``."""
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return float(raw)
    found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smhd]?)\s*", str(raw).lower())
    if not found:
        raise ValueError(f"not a duration: {raw!r} (give seconds, or a number with s, m, h or d)")
    return float(found[1]) * _UNITS[found[2]]


def coerce(variable: str, kind: Any, raw: Any, duration: bool = False) -> Any:
    """``raw`` (a string from the environment, or a value from a config file) as ``kind``."""
    kind_name = getattr(kind, "__name__", str(kind))
    try:
        if duration:
            return parse_duration(raw)
        if kind is bool or kind_name == "bool":
            return raw if isinstance(raw, bool) else parse_bool(str(raw))
        if kind in (int, float) or kind_name in ("int", "float"):
            return (int if kind_name == "int" else float)(raw)
        if kind is Path or "Path" in kind_name:
            return Path(raw)
        return str(raw)
    except ValueError as exc:
        shown = "(hidden)" if any(w in variable.lower() for w in SECRET_WORDS) else repr(raw)
        raise ConfigError(f"setting {variable}={shown} is not a valid {kind_name}") from exc


def read_fields(
    cls: type,
    env: Mapping[str, str],
    prefix: str,
    *,
    fallback: Callable[[str], Any] | None = None,
    durations: tuple[str, ...] = (),
    skip: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The fields of dataclass ``cls`` that ``env`` sets as ``<prefix><FIELD>`` (else that
    ``fallback(field)`` gives), each read by the type of its default."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        raw: Any = env.get(prefix + f.name.upper())
        if raw in (None, "") and fallback is not None:
            raw = fallback(f.name)
        if raw in (None, ""):
            continue
        values[f.name] = coerce(prefix + f.name.upper(), _kind(f), raw, duration=f.name in durations)
    return values


def _kind(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING and f.default is not None:
        return type(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return type(f.default_factory())
    return f.type  # a name, as ``from __future__ import annotations`` keeps it
