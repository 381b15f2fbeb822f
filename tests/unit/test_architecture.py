"""The rules of the layout, checked on the source: the domain imports no server's client,
one function writes a deployment's state, every Redis key name lives in dm/keys.py."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: the domain: rules and decisions, over the ports of dm.ports
DOMAIN = ["dm.lifecycle", "dm.ports", "dm.deployer", "dm.balancer", "dm.models", "dm.reconcilers",
          "dm.reconcilers.detect", "dm.reconcilers.replace", "dm.reconcilers.scale", "dm.reconcilers.allocations",
          "workers.policy", "dm.adapters.memory"]  # fmt: skip
CODE = [p for d in ("dm", "workers", "bridge") for p in (ROOT / d).rglob("*.py")]


def source(path: Path) -> str:
    return path.read_text()


def test_no_domain_module_loads_celery_pymongo_or_redis() -> None:
    probe = (
        f"import sys; import {', '.join(DOMAIN)}; "
        "print(sorted(m for m in ('celery', 'kombu', 'pymongo', 'bson', 'redis') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_only_the_lifecycle_calls_the_stores_write() -> None:
    for write in (".compare_and_set(", ".compare_and_set_many("):
        callers = sorted(str(p.relative_to(ROOT)) for p in CODE if write in source(p))
        assert callers == ["dm/lifecycle.py"], write


def test_nothing_else_updates_a_deployment_document() -> None:
    pattern = re.compile(r"deployments\.(update_one|update_many|find_one_and_update|replace_one|bulk_write)")
    assert [str(p.relative_to(ROOT)) for p in CODE if pattern.search(source(p))] == []


def test_every_redis_key_name_is_in_dm_keys() -> None:
    pattern = re.compile(r"""["']dm:[a-z_{]""")
    found = sorted(str(p.relative_to(ROOT)) for p in CODE if pattern.search(source(p)))
    assert found == ["dm/keys.py"]


def test_lua_scripts_are_files_loaded_once() -> None:
    fleet = source(ROOT / "dm" / "fleet" / "scripts.py")
    assert "redis.call(" not in fleet
    scripts = sorted(p.name for p in (ROOT / "dm" / "lua").glob("*.lua"))
    assert "decide.lua" in scripts and "node.lua" in scripts
    assert all(f'"{name}"' in fleet for name in scripts)  # each read by fleet.py, once, at import
