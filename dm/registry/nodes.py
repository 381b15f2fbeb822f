"""Nodes: the durable record of each node (``nodes``); the truth of a node's state, which
:func:`dm.lifecycle.set_node_state` writes first and copies to the fleet's hash."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from dm.registry.base import Collections

Doc = dict[str, Any]


class Nodes(Collections):
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
