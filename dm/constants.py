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

#: Redis keys (``{}`` is the node id)
KEY_PREFIX = "dm:"
#: set of node ids the balancer considers
NODES_KEY = "dm:nodes"
#: hash: capacity, state and the last metrics sample of a node
NODE_KEY = "dm:node:{}"
#: liveness lease of a node (a key with a TTL)
LEASE_KEY = "dm:lease:{}"
#: hash: deployment id -> JSON {cpu, memory, ts}: declared demand placed on a node
ALLOC_KEY = "dm:alloc:{}"
#: hash: deployment id -> JSON {cpu (cores), memory (MiB), memory_limit (MiB), ts}: what each
#: deployment on a node uses now, written by the node every metrics interval (expires)
USAGE_KEY = "dm:usage:{}"
#: lock held around decide + reserve, so concurrent deployers never overcommit
PLACEMENT_LOCK = "dm:lock:placement"
#: lock held by the heartbeat check, so two beats do one check at a time
HEARTBEAT_LOCK = "dm:lock:heartbeat"
#: lock held while the node manager starts or stops nodes
NODE_MANAGER_LOCK = "dm:lock:nodes"
#: lease held by the one bridge that publishes deployment events to Kafka
EVENTS_LOCK = "dm:lock:bridge-events"
#: lease held by the one control worker whose relay copies events (dm.relay)
RELAY_LOCK = "dm:lock:relay"
#: sorted set: deployment id -> time placed, of a node's recent allocations (reserved demand)
RECENT_KEY = "dm:recent:{}"
#: token replaced by every algorithm added: caches of "the latest version" check it
ALGORITHMS_REV = "dm:algorithms:rev"
#: pub/sub channel a node listens on for kill orders (fencing)
NODE_CHANNEL = "dm:node:{}:control"

#: Kafka topics and group
REQUESTS_TOPIC = "dm.requests"
DLQ_TOPIC = "dm.requests.dlq"
EVENTS_TOPIC = "dm.events"
BRIDGE_GROUP = "dm-bridge"

#: placement threshold, percent of capacity on cpu and on ram
DEFAULT_THRESHOLD = 80.0
#: seconds a node's lease lives without renewal
DEFAULT_LEASE_TTL = 3.0
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
