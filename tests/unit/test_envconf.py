"""One way to read settings from the environment (dm/envconf.py), for dm, the bridge and Celery."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bridge.settings import BridgeSettings
from dm.envconf import coerce, parse_duration
from dm.errors import ConfigError
from dm.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("raw", "seconds"), [("90", 90.0), ("30m", 1800.0), ("7d", 604800.0), (2, 2.0)])
def test_durations(raw: object, seconds: float) -> None:
    assert parse_duration(raw) == seconds


def test_a_boolean_is_the_word() -> None:
    assert coerce("X", bool, "False") is False and coerce("X", bool, "on") is True
    with pytest.raises(ConfigError, match="X='maybe'"):
        coerce("X", bool, "maybe")


def test_a_bad_secret_is_not_shown() -> None:
    with pytest.raises(ConfigError, match=r"DM_KAFKA_SASL_PASSWORD=\(hidden\)"):
        coerce("DM_KAFKA_SASL_PASSWORD", int, "hunter2")


def test_dm_and_the_bridge_read_their_variables_the_same_way(tmp_path: Path) -> None:
    env = {"DM_HOME": str(tmp_path), "DM_LEASE_TTL": "4.5", "DM_MAX_NODES": "3", "DM_RETENTION": "2d",
           "DM_BRIDGE_BATCH_SIZE": "7", "DM_KAFKA_SSL_CHECK_HOSTNAME": "false"}  # fmt: skip
    s = Settings.from_env(env)
    assert (s.lease_ttl, s.max_nodes, s.retention, s.home) == (4.5, 3, 172800.0, tmp_path)
    b = BridgeSettings.from_env(env)
    assert b.security.ssl_check_hostname is False
    assert b.batch_size == 7
    with pytest.raises(ConfigError, match="DM_MAX_NODES='many'"):
        Settings.from_env({**env, "DM_MAX_NODES": "many"})


def test_a_celery_override_of_a_boolean_reads_the_word() -> None:
    probe = "import celeryconfig; print(celeryconfig.task_acks_late, celeryconfig.worker_prefetch_multiplier)"
    env = {"CELERY_TASK_ACKS_LATE": "False", "CELERY_WORKER_PREFETCH_MULTIPLIER": "4", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "4"]
