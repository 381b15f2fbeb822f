"""The registry on MongoDB: algorithms (archives in GridFS), nodes, deployments, events.

Reads of deployments and events for users, and the records made once (algorithms, a
new deployment, nodes). A deployment's moves are written by :func:`dm.lifecycle.transition`
through :class:`dm.adapters.mongo.MongoDeployments`, each one write that also pushes its
event onto the deployment's own ``history``; the relay (:mod:`dm.relay`) copies history
entries into the ``events`` collection, and the deployment's ``rev`` orders its events.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import gridfs
import pymongo
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError, PyMongoError

from dm import constants as c
from dm.errors import BadPackage, RegistryUnavailable, UnknownAlgorithm, UnknownDeployment
from dm.lifecycle import new_deployment
from dm.models import ACTIVE_STATES, AlgorithmSpec, DeployRequest
from dm.ports import EventLog

Doc = dict[str, Any]

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


#: event numbers looked up in one query (see Registry.events_between)
EVENT_SPAN = 2000


class EventCursor:
    """Reads the events collection incrementally, in the relay's order, each event once.

    By ``seq`` (also the ``_id``), the number the relay gives each event it stores, and only
    up to the mark it saves after each batch, so a batch being written is never seen in part.
    """

    def __init__(self, registry: EventLog, query: Doc | None = None) -> None:
        self.registry = registry
        self.query = dict(query or {})
        self.last = 0  # seq of the newest event read

    def skip(self, events: list[Doc]) -> None:
        """Mark events as read (e.g. the ones shown before following)."""
        for event in events:
            self.last = max(self.last, int(event.get("seq") or 0))

    def poll(self, limit: int = 0) -> list[Doc]:
        mark = self.registry.events_mark()
        if mark <= self.last:
            return []
        upto = min(mark, self.last + EVENT_SPAN)  # a span at a time: the numbers are looked up
        new = self.registry.events_between(self.last, upto, self.query, limit)
        if new:
            self.skip(new)
        if not limit or len(new) < limit:
            self.last = upto  # nothing else up to there matches the query
        return new


class Registry:
    def __init__(self, mongo_url: str, database: str = "dm") -> None:
        self.db: Database[Doc] = mongo_client(mongo_url)[database]
        self.algorithms: Collection[Doc] = self.db[c.ALGORITHMS]
        self.nodes: Collection[Doc] = self.db[c.NODES]
        self.deployments: Collection[Doc] = self.db[c.DEPLOYMENTS]
        self.events: Collection[Doc] = self.db[c.EVENTS]
        self.fs = gridfs.GridFSBucket(self.db, bucket_name=c.PACKAGES_BUCKET)
        #: called after an algorithm version is added (the control context bumps a counter)
        self.algorithm_added: Callable[[], object] = lambda: None

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
        # every index is paid for on each transition (SecantusDB writes each on every update,
        # about 0.3 ms apiece), so one per kind of query: by request id; by node (and state);
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

    # -- algorithms --------------------------------------------------------------

    def add_algorithm(self, spec: AlgorithmSpec, archive: bytes, sha256: str) -> Doc:
        key = f"{spec.name}:{spec.version}"
        existing = self.algorithms.find_one({"_id": key})
        if existing is not None:
            if existing["sha256"] == sha256:
                return existing
            raise BadPackage(
                f"{spec.name} version {spec.version} is already stored with other contents; "
                "bump `version` in algorithm.toml to add a new version"
            )
        file_id = self.fs.upload_from_stream(f"{key}.tar.gz", archive, metadata={"sha256": sha256})
        doc: Doc = {
            "_id": key,
            "name": spec.name,
            "version": spec.version,
            "sha256": sha256,
            "size": len(archive),
            "file_id": file_id,
            "spec": spec.to_dict(),
            "created_at": time.time(),
        }
        try:
            self.algorithms.insert_one(doc)
        except DuplicateKeyError:
            self.fs.delete(file_id)  # a concurrent add of the same version won
            return self.add_algorithm(spec, archive, sha256)
        self.algorithm_added()
        return doc

    def get_algorithm(self, name: str, version: str | None = None) -> Doc:
        if version:
            doc = self.algorithms.find_one({"_id": f"{name}:{version}"})
        else:
            doc = self.algorithms.find_one({"name": name}, sort=[("created_at", -1)])
        if doc is None:
            known = sorted({d["name"] for d in self.algorithms.find({}, {"name": 1})})
            which = f"{name} version {version}" if version else name
            raise UnknownAlgorithm(
                f"unknown algorithm {which!r}; add it with `dm algorithms add DIR` "
                f"(known: {', '.join(known) or 'none yet'})"
            )
        return doc

    def list_algorithms(self) -> list[Doc]:
        return list(self.algorithms.find({}, {"file_id": 0}).sort([("name", 1), ("created_at", -1)]))

    def fetch_archive(self, sha256: str) -> bytes:
        doc = self.algorithms.find_one({"sha256": sha256})
        if doc is None:
            raise BadPackage(f"no package with sha256 {sha256} in the repository")
        return self.fs.open_download_stream(doc["file_id"]).read()

    # -- nodes -------------------------------------------------------------------

    def upsert_node(self, node_id: str, **fields: Any) -> None:
        fields["updated_at"] = time.time()
        self.nodes.update_one(
            {"_id": node_id}, {"$set": fields, "$setOnInsert": {"created_at": time.time()}}, upsert=True
        )

    def get_node(self, node_id: str) -> Doc | None:
        return self.nodes.find_one({"_id": node_id})

    def set_node_state(self, node_id: str, state: str, expect: Iterable[str] | None = None) -> bool:
        query: Doc = {"_id": node_id}
        if expect is not None:
            query["state"] = {"$in": list(expect)}
        result = self.nodes.update_one(query, {"$set": {"state": state, "updated_at": time.time()}})
        return result.modified_count == 1

    def list_nodes(self, states: Iterable[str] | None = None) -> list[Doc]:
        query: Doc = {"state": {"$in": list(states)}} if states is not None else {}
        return list(self.nodes.find(query).sort("_id", 1))

    # -- deployments -------------------------------------------------------------

    def create_deployment(self, request: DeployRequest, algorithm: Doc, **placed: Any) -> tuple[Doc, bool]:
        """Record a deployment (one write, its events included); the same request id gives
        back the first one. ``placed`` (node, reason) records it already ``scheduled``."""
        doc = self.new_deployment(request, algorithm, **placed)
        try:
            self.deployments.insert_one(doc)
        except DuplicateKeyError:
            existing = self.deployments.find_one({"request_id": doc["request_id"]})
            if existing is None:  # a clash of the random _id, not of the request id: again
                return self.create_deployment(request, algorithm, **placed)
            return existing, False
        return doc, True

    def get_deployment(self, dep_id: str) -> Doc:
        doc = self.deployments.find_one({"_id": dep_id})
        if doc is None:
            doc = self.deployments.find_one({"request_id": dep_id})
        if doc is None:
            raise UnknownDeployment(f"no deployment {dep_id!r}; `dm deployments` lists them")
        return doc

    def list_deployments(
        self, states: Iterable[str] | None = None, node: str | None = None, limit: int = 0
    ) -> list[Doc]:
        query: Doc = {}
        if states is not None:
            query["state"] = {"$in": list(states)}
        if node is not None:
            query["node"] = node
        return list(self.deployments.find(query, {"history": 0}).sort("created_at", 1).limit(limit))

    def active_on(self, node_id: str) -> list[Doc]:
        return self.list_deployments(ACTIVE_STATES, node=node_id)

    def count_by_state(self) -> dict[str, int]:
        rows = self.deployments.aggregate([{"$group": {"_id": "$state", "n": {"$sum": 1}}}])
        return {row["_id"]: row["n"] for row in rows}

    def list_events(self, deployment_id: str | None = None, limit: int = 50) -> list[Doc]:
        """The last ``limit`` events; one deployment's in ``rev`` order, all in the relay's order.

        Not by ``_id`` or time: clocks of processes and hosts differ; ``seq`` is the relay's.
        """
        if deployment_id:
            # the deployment's own history is current (the relay copies it a moment later);
            # the events collection has what is older than the history keeps
            doc = self.deployments.find_one({"_id": deployment_id}, {"history": 1})
            history = list((doc or {}).get("history") or [])
            first = history[0]["rev"] if history else None
            if first is not None and (first == 0 or len(history) >= limit):
                return history[-limit:] if limit else history
            query: Doc = {"deployment_id": deployment_id}
            if first is not None:
                query["rev"] = {"$lt": first}
            older = list(self.events.find(query).sort("rev", -1).limit(max(limit - len(history), 0)))
            older.reverse()
            rows = [*older, *history]
            return rows[-limit:] if limit else rows
        return self.last_events(limit)

    # -- the Kafka bridge: bulk intake, event publishing ---------------------------------

    def create_deployments(self, items: list[tuple[DeployRequest, Doc]]) -> list[tuple[Doc, bool]]:
        """Record ``pending`` deployments with one ``insert_many``; idempotent on request id.

        ``items`` are (request, algorithm document) with distinct request ids. Returns
        (deployment, created) per item, in order: a request id already recorded gives back
        the first deployment. Each document carries its ``pending`` event (see the module).
        """
        from pymongo.errors import BulkWriteError

        docs = [self.new_deployment(request, algorithm) for request, algorithm in items]
        refused: list[int] = []
        try:
            if docs:
                self.deployments.insert_many(docs, ordered=False)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            if any(e.get("code") != 11000 for e in errors):
                raise
            refused = sorted(int(e["index"]) for e in errors)
        results: list[tuple[Doc, bool]] = [(doc, True) for doc in docs]
        if refused:
            query = {"request_id": {"$in": [docs[i]["request_id"] for i in refused]}}
            found = {d["request_id"]: d for d in self.deployments.find(query)}
            for i in refused:
                if docs[i]["request_id"] in found:
                    results[i] = (found[docs[i]["request_id"]], False)
                else:  # a clash of the random _id, not of the request id: again, with a new id
                    results[i] = self.create_deployments([items[i]])[0]
        return results

    def new_deployment(
        self, request: DeployRequest, algorithm: Doc, node: str | None = None, reason: str = "", since: float = 0.0
    ) -> Doc:
        """See :func:`dm.lifecycle.new_deployment`."""
        return new_deployment(request, algorithm, node=node, reason=reason, since=since)

    def events_between(self, after: int, upto: int, query: Doc, limit: int = 0) -> list[Doc]:
        """Events numbered in (after, upto] that match ``query``, in the relay's order.

        The numbers are looked up (``$in``), not read as an ``_id`` range: SecantusDB scans
        the collection for a range (336 ms at 30,000 events against 0.8 ms); callers keep a
        span to :data:`EVENT_SPAN` numbers at a time."""
        ids = list(range(after + 1, upto + 1))
        rows = sorted(self.events.find({**query, "_id": {"$in": ids}}), key=lambda e: e["_id"])
        return rows[:limit] if limit else rows

    def last_events(self, limit: int) -> list[Doc]:
        """The last ``limit`` events up to the relay's mark, oldest first (numbers looked up;
        they may have gaps, so the span widens until it holds enough)."""
        mark = self.events_mark()
        span = limit
        while mark > 0 and limit > 0:
            low = max(0, mark - span)
            rows = self.events_between(low, mark, {})
            if len(rows) >= limit or low == 0:
                return rows[-limit:]
            span *= 4
        return []

    def highest_event(self) -> int:
        """The highest number stored: at the mark, or past it when a relay died between a write
        and saving the mark (looked up a span at a time above the mark)."""
        seq = self.events_mark()
        while True:
            found = [e["_id"] for e in self.events.find({"_id": {"$in": list(range(seq + 1, seq + EVENT_SPAN + 1))}},
                                                        {"_id": 1})]  # fmt: skip
            if not found:
                return seq
            seq = max(int(i) for i in found)

    def events_mark(self) -> int:
        """The relay's mark: every event numbered up to it is stored (see :mod:`dm.relay`)."""
        meta = self.db[c.META].find_one({"_id": "relay"}, {"seq": 1})
        return int((meta or {}).get("seq") or 0)
