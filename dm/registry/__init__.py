"""The registry on MongoDB, one module per aggregate: :mod:`.algorithms` (versions, archives in
GridFS), :mod:`.nodes` (the nodes' durable record), :mod:`.deployments` (recorded once, read
for users), :mod:`.events` (the relay's numbered copies and the one cursor over them).

Reads of deployments and events for users, and the records made once (algorithms, a
new deployment, nodes). A deployment's moves are written by :func:`dm.lifecycle.transition`
through :class:`dm.adapters.mongo.MongoDeployments`, each one write that also pushes its
event onto the deployment's own ``history``; the relay (:mod:`dm.relay`) copies history
entries into the ``events`` collection, and the deployment's ``rev`` orders its events.
"""

from __future__ import annotations

import uuid
from typing import Any

import gridfs
import pymongo
from pymongo.errors import DuplicateKeyError, PyMongoError

from dm import constants as c
from dm.errors import RegistryUnavailable
from dm.registry.algorithms import Algorithms
from dm.registry.base import Doc
from dm.registry.deployments import Deployments
from dm.registry.events import EVENT_SPAN, EventCursor, Events
from dm.registry.nodes import Nodes

__all__ = ["EVENT_SPAN", "Doc", "EventCursor", "Registry", "mongo_client", "new_id"]

_clients: dict[str, pymongo.MongoClient[Doc]] = {}


def mongo_client(url: str) -> pymongo.MongoClient[Doc]:
    """One client per URL and process (clients are thread-safe and pool connections)."""
    client = _clients.get(url)
    if client is None:
        # a socket timeout, so a call across a cut network fails instead of hanging (the URL may override)
        options: dict[str, Any] = {} if "sockettimeoutms" in url.lower() else {"socketTimeoutMS": 10000}
        client = pymongo.MongoClient(url, serverSelectionTimeoutMS=5000, connectTimeoutMS=3000, **options)
        _clients[url] = client
    return client


def new_id() -> str:
    return uuid.uuid4().hex[:12]


class Registry(Algorithms, Nodes, Deployments, Events):
    """The registry on MongoDB, one part per aggregate (algorithms, nodes, deployments, events)."""

    def __init__(self, mongo_url: str, database: str = "dm") -> None:
        self.db = mongo_client(mongo_url)[database]
        self.algorithms = self.db[c.ALGORITHMS]
        self.nodes = self.db[c.NODES]
        self.deployments = self.db[c.DEPLOYMENTS]
        self.events = self.db[c.EVENTS]
        self.fs = gridfs.GridFSBucket(self.db, bucket_name=c.PACKAGES_BUCKET)
        #: called after an algorithm version is added (the control context bumps a counter)
        self.algorithm_added = lambda: None

    def ping(self) -> None:
        try:
            self.db.command("ping")
        except PyMongoError as exc:
            raise RegistryUnavailable(
                f"cannot reach MongoDB ({exc}); check DM_MONGO_URL or start the stack with `dm up`"
            ) from exc

    def ensure_indexes(self) -> None:
        """One index per query the code makes."""
        self.algorithms.create_index([("name", 1), ("created_at", -1)])
        self.algorithms.create_index("sha256")
        self.nodes.create_index("state")
        # every index is paid for on each transition (SecantusDB handles each on every update,
        # about 0.4 ms apiece, whether the document has an entry in it or not: a partial index
        # costs as much, measured), so one per kind of query: by request id; by node (and state);
        # by state and age (counts per state, the waiting ones, `dm deployments` newest first
        # a state at a time); by state and time scheduled (the start timeout).
        # tests/test_scale.py has the registry explain each query the code makes.
        self.deployments.create_index("request_id", unique=True)
        self.deployments.create_index([("node", 1), ("state", 1)])
        self.deployments.create_index([("state", 1), ("created_at", -1)])
        self.deployments.create_index([("state", 1), ("scheduled_at", 1)])
        if "state_1_node_1" in self.deployments.index_information():
            self.deployments.drop_index("state_1_node_1")  # replaced by (state, created_at)
        self._unique_event_index()  # and the relay's number is the _id: no index of its own

    def _unique_event_index(self) -> None:
        """(deployment_id, rev) is unique, so the relay copying an event twice stores it once.

        Stores made before the relay have the same index without ``unique``: it is replaced.
        """
        key = [("deployment_id", 1), ("rev", 1)]
        try:
            self.events.create_index(key, unique=True)
        except pymongo.errors.OperationFailure:
            self.events.drop_index(key)
            try:
                self.events.create_index(key, unique=True)
            except DuplicateKeyError:  # an old store holds an event twice: keep the plain index
                self.events.create_index(key)
