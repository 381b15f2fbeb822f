"""Names and default tunables, in one place."""

from __future__ import annotations

#: Celery queue of the control plane: deploy, stop, heartbeat
CONTROL_QUEUE = "dm.control"
#: a node's own queue is this prefix + its id
NODE_QUEUE_PREFIX = "node."
#: Celery worker name of a node agent (``%h`` is the host)
NODE_WORKER_NAME = "node-{node_id}@%h"

#: MongoDB collections
ALGORITHMS = "algorithms"
NODES = "nodes"
DEPLOYMENTS = "deployments"
EVENTS = "events"
#: small state documents of dm itself (the relay's position)
META = "meta"
#: GridFS bucket of algorithm archives
PACKAGES_BUCKET = "packages"

#: Redis key names: dm.keys

#: Kafka topics and group
REQUESTS_TOPIC = "dm.requests"
DLQ_TOPIC = "dm.requests.dlq"
EVENTS_TOPIC = "dm.events"
BRIDGE_GROUP = "dm-bridge"

#: placement threshold, percent of capacity on cpu and on ram
DEFAULT_THRESHOLD = 80.0
#: seconds a node's lease lives without renewal. A node kills its algorithms after 0.75 of
#: it without a renewal (7.5 s): longer than a control-store stall dm rides through (5 s,
#: with a renewal every second: 1 s + 5 s < 7.5 s), and 2.5 s before the control plane may
#: place them elsewhere (10 s + its 0.5 s check). A process that dies is seen at once by
#: its presence connection, not by the lease.
DEFAULT_LEASE_TTL = 10.0
#: seconds between metrics samples / lease renewals
DEFAULT_METRICS_INTERVAL = 1.0
#: seconds between heartbeat checks (beat)
DEFAULT_HEARTBEAT_INTERVAL = 0.5
#: seconds a deployment may stay ``scheduled`` before it is placed again
DEFAULT_START_TIMEOUT = 30.0
#: seconds an idle node above min_nodes lives before it is stopped
DEFAULT_IDLE_TIMEOUT = 60.0
#: seconds a reservation counts on top of measured usage (metrics lag behind)
DEFAULT_RESERVATION_SETTLE = 3.0
#: default capacity of a local node
DEFAULT_NODE_CPUS = 1.0
DEFAULT_NODE_MEMORY = 1024.0
DEFAULT_MIN_NODES = 1
DEFAULT_MAX_NODES = 8
#: Flower
DEFAULT_FLOWER_ADDRESS = "127.0.0.1"
DEFAULT_FLOWER_PORT = 5555

#: how long a caller waiting on a result (``deploy.delay(...).get()``) tries to resubscribe
#: when Redis is away: about a minute (Celery's default gives up after ~20 s and says the
#: application must be restarted); Celery's result backend ``retry_policy``
RESULT_RETRY_POLICY = {"max_retries": 120, "interval_start": 0, "interval_step": 0.5, "interval_max": 0.5}
