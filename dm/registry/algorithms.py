"""Algorithms: their versions (``algorithms``) and packed archives (GridFS ``packages``)."""

from __future__ import annotations

import time
from typing import Any

from pymongo.errors import DuplicateKeyError

from dm.errors import BadPackage, UnknownAlgorithm
from dm.models import AlgorithmSpec
from dm.registry.base import Collections

Doc = dict[str, Any]


class Algorithms(Collections):
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
