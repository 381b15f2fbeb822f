"""What every part of the registry shares: its collections (set by :class:`dm.registry.Registry`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gridfs
from pymongo.collection import Collection
from pymongo.database import Database

Doc = dict[str, Any]


class Collections:
    """The collections a part of the registry reads and writes."""

    db: Database[Doc]
    algorithms: Collection[Doc]
    nodes: Collection[Doc]
    deployments: Collection[Doc]
    events: Collection[Doc]
    fs: gridfs.GridFSBucket
    algorithm_added: Callable[[], object]
