"""Celery settings for dm. Each may be overridden by an environment variable of the same
name in upper case with a ``CELERY_`` prefix (e.g. ``CELERY_WORKER_PREFETCH_MULTIPLIER``).

dm's own settings may also be set here as ``dm_<field>`` (see ``dm/settings.py``);
``DM_*`` environment variables win over them.
"""

import os

from dm.constants import RESULT_RETRY_POLICY as _RESULT_RETRY_POLICY
from dm.envconf import coerce

# JSON only: the broker must never be a way to run code
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
event_serializer = "json"

task_default_queue = "dm.control"
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1
worker_send_task_events = True
task_send_sent_event = True
# no STARTED state in the result backend: a write before every task, and Flower learns
# that a task started from the task events anyway
task_track_started = False
result_expires = 3600
broker_connection_retry_on_startup = True
# keep reconnecting to the broker for as long as it is away (Celery's default gives up after 100 tries)
broker_connection_retry = True
broker_connection_max_retries = None
worker_cancel_long_running_tasks_on_connection_loss = False
# a task taken by a worker that died unacknowledged goes back to its queue after this
# many seconds (Celery's default is an hour); dm's tasks take well under a second, and
# deploy is idempotent (the task id is the default request id), so a redelivery is harmless
# a connect to an address that is gone fails in seconds, not a TCP time-out of minutes
broker_transport_options = {"visibility_timeout": 120, "socket_connect_timeout": 5, "socket_keepalive": True}
# dm.app adds to these what DM_REDIS_URL needs: ``master_name`` and the Sentinels' own
# timeouts for a sentinel:// URL (see dm/redis_conn.py); ``broker_use_ssl`` and
# ``redis_backend_use_ssl`` for a rediss:// one
# a caller waiting on a result that meets a Redis outage resubscribes for about a minute
result_backend_transport_options: dict[str, object] = {"retry_policy": dict(_RESULT_RETRY_POLICY)}
# a result write that meets a Redis failover or restart is tried again for about 10 s
# (Celery's default gives up at once, and a caller waiting on the result never hears)
result_backend_always_retry = True
result_backend_max_retries = 40
result_backend_base_sleep_between_retries_ms = 50
result_backend_max_sleep_between_retries_ms = 500
# a connect to a Redis that is gone (an old master) fails in seconds, not a TCP time-out
redis_socket_connect_timeout = 5
worker_hijack_root_logger = False
enable_utc = True
timezone = "UTC"

for _name, _value in list(globals().items()):
    _env = os.environ.get("CELERY_" + _name.upper())
    if _env is not None and not _name.startswith("_") and _value is not None:
        # read by the type of the default, as dm's own settings are (a boolean is the word)
        kind = type(_value) if isinstance(_value, (bool, int, float, str)) else str
        globals()[_name] = coerce("CELERY_" + _name.upper(), kind, _env)
