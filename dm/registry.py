"""The registry on MongoDB: algorithms (archives in GridFS), nodes, deployments, events.

Every deployment transition is a compare-and-set on (id, expected state,
generation) followed by an event; the deployment's ``rev`` orders its events.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from typing import Any

import gridfs
import pymongo
from pymongo import ReturnDocument
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError, PyMongoError

from dm import constants as c
from dm.errors import BadPackage, RegistryUnavailable, UnknownAlgorithm, UnknownDeployment
from dm.models import ACTIVE_STATES, PENDING, AlgorithmSpec, DeployRequest

Doc = dict[str, Any]

_clients: dict[str, pymongo.MongoClient[Doc]] = {}


def mongo_client(url: str) -> pymongo.MongoClient[Doc]:
    """One client per URL and process (clients are thread-safe and pool connections)."""
    client = _clients.get(url)
    if client is None:
        client = pymongo.MongoClient(url, serverSelectionTimeoutMS=5000, connectTimeoutMS=3000)
        _clients[url] = client
    return client


def new_id() -> str:
    return uuid.uuid4().hex[:12]


class Registry:
    def __init__(self, mongo_url: str, database: str = "dm") -> None:
        self.db: Database[Doc] = mongo_client(mongo_url)[database]
        self.algorithms: Collection[Doc] = self.db[c.ALGORITHMS]
        self.nodes: Collection[Doc] = self.db[c.NODES]
        self.deployments: Collection[Doc] = self.db[c.DEPLOYMENTS]
        self.events: Collection[Doc] = self.db[c.EVENTS]
        self.fs = gridfs.GridFSBucket(self.db, bucket_name=c.PACKAGES_BUCKET)

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
        self.deployments.create_index("request_id", unique=True)
        self.deployments.create_index([("state", 1), ("node", 1)])
        self.deployments.create_index([("node", 1), ("state", 1)])
        self.deployments.create_index("created_at")
        self.events.create_index([("deployment_id", 1), ("rev", 1)])
        self.events.create_index([("published", 1), ("_id", 1)])
        self.events.create_index("time")

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

    def create_deployment(self, request: DeployRequest, algorithm: Doc) -> tuple[Doc, bool]:
        """Record a ``pending`` deployment; the same request id gives back the first one."""
        spec = algorithm["spec"]
        now = time.time()
        dep_id = new_id()
        doc: Doc = {
            "_id": dep_id,
            "request_id": request.request_id or dep_id,
            "algorithm": algorithm["name"],
            "version": algorithm["version"],
            "sha256": algorithm["sha256"],
            "args": request.args,
            "command": spec["command"],
            "env": spec.get("env") or {},
            "demand": spec["demand"],
            "restart": spec["restart"],
            "state": PENDING,
            "node": None,
            "generation": 0,
            "rev": 0,
            "pid": None,
            "restarts": 0,
            "exit_code": None,
            "reason": "requested",
            "created_at": now,
            "updated_at": now,
        }
        try:
            self.deployments.insert_one(doc)
        except DuplicateKeyError:
            existing = self.deployments.find_one({"request_id": doc["request_id"]})
            if existing is None:  # pragma: no cover - the unique index says it exists
                raise
            return existing, False
        self._event(doc)
        return doc, True

    def get_deployment(self, dep_id: str) -> Doc:
        doc = self.deployments.find_one({"_id": dep_id})
        if doc is None:
            doc = self.deployments.find_one({"request_id": dep_id})
        if doc is None:
            raise UnknownDeployment(f"no deployment {dep_id!r}; `dm deployments` lists them")
        return doc

    def transition(
        self,
        dep_id: str,
        state: str,
        *,
        expect: Iterable[str],
        generation: int | None = None,
        reason: str = "",
        new_generation: bool = False,
        **fields: Any,
    ) -> Doc | None:
        """Compare-and-set the state; returns the new document, or None when refused."""
        query: Doc = {"_id": dep_id, "state": {"$in": list(expect)}}
        if generation is not None:
            query["generation"] = generation
        update: Doc = {
            "$set": {"state": state, "reason": reason, "updated_at": time.time(), **fields},
            "$inc": {"rev": 1, **({"generation": 1} if new_generation else {})},
        }
        doc = self.deployments.find_one_and_update(query, update, return_document=ReturnDocument.AFTER)
        if doc is not None:
            self._event(doc)
        return doc

    def _event(self, doc: Doc) -> None:
        self.events.insert_one(
            {
                "deployment_id": doc["_id"],
                "request_id": doc["request_id"],
                "algorithm": doc["algorithm"],
                "state": doc["state"],
                "node": doc.get("node"),
                "generation": doc["generation"],
                "rev": doc["rev"],
                "time": doc["updated_at"],
                "reason": doc.get("reason", ""),
                "exit_code": doc.get("exit_code"),
                "published": False,
            }
        )

    def list_deployments(
        self, states: Iterable[str] | None = None, node: str | None = None, limit: int = 0
    ) -> list[Doc]:
        query: Doc = {}
        if states is not None:
            query["state"] = {"$in": list(states)}
        if node is not None:
            query["node"] = node
        return list(self.deployments.find(query).sort("created_at", 1).limit(limit))

    def active_on(self, node_id: str) -> list[Doc]:
        return self.list_deployments(ACTIVE_STATES, node=node_id)

    def count_by_state(self) -> dict[str, int]:
        rows = self.deployments.aggregate([{"$group": {"_id": "$state", "n": {"$sum": 1}}}])
        return {row["_id"]: row["n"] for row in rows}

    def list_events(self, deployment_id: str | None = None, limit: int = 50) -> list[Doc]:
        query: Doc = {"deployment_id": deployment_id} if deployment_id else {}
        rows = list(self.events.find(query).sort("_id", -1).limit(limit))
        rows.reverse()
        return rows
