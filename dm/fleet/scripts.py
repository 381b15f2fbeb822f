"""The fleet's Lua scripts (``dm/lua``): read once per process, registered once per client."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import redis


def _lua(name: str, prelude: str = "") -> str:
    """A script of ``dm/lua``, with a prelude of shared functions before it."""
    here = Path(__file__).parent.parent / "lua"
    head = (here / prelude).read_text() if prelude else ""
    return head + (here / name).read_text()


#: the scripts, read once per process and registered once per client (see ``_script``)
_ALLOCATE = _lua("allocate.lua", prelude="node.lua")
_RELEASE = _lua("release.lua")
_SNAPSHOT = _lua("snapshot.lua", prelude="node.lua")
_DECIDE = _lua("decide.lua", prelude="node.lua")
_DECIDE_MANY = _lua("decide_many.lua", prelude="node.lua")
_UNLOCK = _lua("unlock.lua")
_EXTEND = _lua("extend.lua")
_INDEX = _lua("index.lua", prelude="node.lua")
_OBSERVE = _lua("observe.lua")
_COUNTS = _lua("counts.lua")


def _script(r: redis.Redis, source: str) -> Any:
    """A registered Lua script of this client (EVALSHA, loaded again after a Redis restart)."""
    scripts: dict[str, Any] = r.__dict__.setdefault("_dm_scripts", {})
    if source not in scripts:
        scripts[source] = r.register_script(source)
    return scripts[source]
