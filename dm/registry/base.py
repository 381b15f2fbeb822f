"""What every part of the registry shares: its collections (set by :class:`dm.registry.Registry`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
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


#: ids per ``$in`` lookup. MongoDB finds each id in its index however long the list; the
#: embedded SecantusDB matches every candidate against the list, so a long one costs it
#: more than linearly (2,000 ids 2.6 s; 50 at a time, 1,000 in 70 ms)
IN_CHUNK = 50


def find_in(
    col: Collection[Doc], values: Iterable[Any], projection: Doc | None = None, field: str = "_id", **query: Any
) -> Iterator[Doc]:
    """The documents of ``col`` whose ``field`` is one of ``values`` (and that match ``query``),
    looked up :data:`IN_CHUNK` at a time."""
    values = list(values)
    for low in range(0, len(values), IN_CHUNK):
        yield from col.find({**query, field: {"$in": values[low : low + IN_CHUNK]}}, projection)


def chunks(values: Iterable[Any]) -> Iterator[list[Any]]:
    """``values`` in lists of :data:`IN_CHUNK`, for writes that name many ids (``delete_many``)."""
    values = list(values)
    for low in range(0, len(values), IN_CHUNK):
        yield values[low : low + IN_CHUNK]
