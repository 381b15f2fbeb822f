"""Signed orders: the control plane signs each ``dm.run`` and ``dm.kill``, a node verifies.

Anyone who can write to Redis (or reach Flower's REST API) can push a task onto a
node's queue; a node must run only what the control plane sent. Each order carries an
HMAC-SHA256 over a canonical JSON of the task name and its content, under a key that
never goes to Redis or MongoDB:

- ``DM_SIGNING_KEY`` (a setting, from the environment or ``celeryconfig.py``), else
- the file ``DM_HOME/signing.key``, made 0600 with 32 random bytes on first use.

Every process of one system needs the same key: the processes ``dm up`` starts share
``DM_HOME``; a node on another host gets ``DM_SIGNING_KEY`` in its environment or a copy
of the file (docs/operations.md). A node that cannot verify an order refuses it before
it does anything (workers/tasks.py). A replayed genuine order is no more than a
redelivery: the registry's generation check still decides whether it runs.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import tempfile
from pathlib import Path
from typing import Any

from dm.errors import ConfigError
from dm.settings import Settings

#: the tasks whose orders are signed
SIGNED_TASKS = ("dm.run", "dm.kill")
#: the field of a ``dm.run`` payload that holds its signature
SIGNATURE_FIELD = "sig"
#: the key file under DM_HOME when DM_SIGNING_KEY is not set
KEY_FILE = "signing.key"

_keys: dict[tuple[str, str], bytes] = {}


def key_path(settings: Settings) -> Path:
    return settings.home / KEY_FILE


def signing_key(settings: Settings) -> bytes:
    """The key of this system: ``DM_SIGNING_KEY``, else ``DM_HOME/signing.key`` (made on first use)."""
    cache = (settings.signing_key, str(settings.home))
    found = _keys.get(cache)
    if found is None:
        found = settings.signing_key.encode() if settings.signing_key else _key_file(key_path(settings))
        _keys[cache] = found
    return found


def _key_file(path: Path) -> bytes:
    """Read the key file, or make it: written whole to a 0600 temp file, then linked into
    place, so a concurrent first use never reads a half-written key and one key wins."""
    try:
        data = path.read_bytes().strip()
    except FileNotFoundError:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".signing.", dir=path.parent)  # mkstemp makes it 0600
        try:
            os.write(fd, secrets.token_hex(32).encode() + b"\n")
            os.close(fd)
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another process made it first: use theirs
        finally:
            os.unlink(tmp)
        data = path.read_bytes().strip()
    if len(data) < 16:
        raise ConfigError(f"the signing key in {path} is too short: delete the file (a new one is made) or fix it")
    return data


def _digest(task: str, content: Any, settings: Settings) -> str:
    canonical = json.dumps({"task": task, "order": content}, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hmac.new(signing_key(settings), canonical.encode(), hashlib.sha256).hexdigest()


def _settings(settings: Settings | None) -> Settings:
    if settings is not None:
        return settings
    from dm.control import get_control  # the process's control context (tests set their own)

    return get_control().settings


def sign(payload: dict[str, Any], settings: Settings | None = None, task: str = "dm.run") -> dict[str, Any]:
    """``payload`` with its signature in ``sig`` (a new dict; any old signature replaced)."""
    content = {k: v for k, v in payload.items() if k != SIGNATURE_FIELD}
    return {**content, SIGNATURE_FIELD: _digest(task, content, _settings(settings))}


def verify(payload: Any, settings: Settings | None = None, task: str = "dm.run") -> bool:
    """True when ``payload`` carries the signature the control plane would give it."""
    if not isinstance(payload, dict) or not isinstance(payload.get(SIGNATURE_FIELD), str):
        return False
    content = {k: v for k, v in payload.items() if k != SIGNATURE_FIELD}
    try:
        expected = _digest(task, content, _settings(settings))
    except (TypeError, ValueError):  # not JSON: nothing the control plane sent
        return False
    return hmac.compare_digest(expected, payload[SIGNATURE_FIELD])


def kill_order(dep_id: str, generation: int, reason: str) -> dict[str, Any]:
    """What a ``dm.kill`` signature covers."""
    return {"id": dep_id, "generation": generation, "reason": reason}


def kill_args(dep_id: str, generation: int, reason: str, settings: Settings | None = None) -> list[Any]:
    """The args of a signed ``dm.kill``: ``[dep_id, generation, reason, signature]``."""
    signed = sign(kill_order(dep_id, generation, reason), settings, task="dm.kill")
    return [dep_id, generation, reason, signed[SIGNATURE_FIELD]]


def verify_kill(dep_id: Any, generation: Any, reason: Any, signature: Any, settings: Settings | None = None) -> bool:
    payload = {**kill_order(dep_id, generation, reason), SIGNATURE_FIELD: signature}
    return verify(payload, settings, task="dm.kill")


def sign_order_args(task: str, args: list[Any], settings: Settings | None = None) -> list[Any]:
    """The args of a task message, signed when the task is a signed one (dm.run: its payload)."""
    if task == "dm.run" and args and isinstance(args[0], dict):
        return [sign(args[0], settings), *args[1:]]
    return args
