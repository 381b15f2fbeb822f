"""Deployments: recorded once here (one insert, its events inside; in bulk for the bridge),
read for users. Their moves are written by :func:`dm.lifecycle.transition` through
:class:`dm.adapters.mongo.MongoDeployments`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pymongo.errors import DuplicateKeyError

from dm.errors import UnknownDeployment
from dm.lifecycle import new_deployment
from dm.models import ACTIVE_STATES, DeployRequest
from dm.registry.base import Collections, find_in

Doc = dict[str, Any]


class Deployments(Collections):
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
            asked = [docs[i]["request_id"] for i in refused]
            found = {d["request_id"]: d for d in find_in(self.deployments, asked, field="request_id")}
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
