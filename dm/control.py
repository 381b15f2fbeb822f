"""What a control-plane process holds: settings, the registry and Redis, made once."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from functools import cached_property

import redis

from dm import keys as k
from dm.fleet import redis_client
from dm.outage import is_outage
from dm.ports import Ports
from dm.registry import Doc, Registry
from dm.settings import Settings


@dataclass
class Control:
    settings: Settings

    @cached_property
    def registry(self) -> Registry:
        self.settings.require_servers()
        registry = Registry(self.settings.mongo_url, self.settings.database)
        registry.algorithm_added = lambda: self.redis.set(k.ALGORITHMS_REV, uuid.uuid4().hex)
        return registry

    def algorithm(self, name: str, version: str | None = None) -> Doc:
        """An algorithm's document, as :meth:`Registry.get_algorithm`, from a cache: a stored
        version never changes, and a token in Redis that every add replaces tells when the
        latest version of a name may have (one Redis GET instead of a MongoDB query). A
        missing token (a new or restarted Redis) is replaced by a new one first."""
        if version:
            key: tuple[str, str | None] = (name, version)
        else:
            token = self.redis.get(k.ALGORITHMS_REV)
            if token is None:
                self.redis.set(k.ALGORITHMS_REV, uuid.uuid4().hex, nx=True)
                token = self.redis.get(k.ALGORITHMS_REV)
            key = (name, str(token))
        doc = self._algorithms.get(key)
        if doc is None:
            doc = self.registry.get_algorithm(name, version)
            if len(self._algorithms) > 1000:
                self._algorithms.clear()
            self._algorithms[key] = doc
        return doc

    @cached_property
    def _algorithms(self) -> dict[tuple[str, str | None], Doc]:
        return {}

    def with_settings(self, **changes: object) -> Control:
        """A context with changed settings that shares this one's connections."""
        other = Control(self.settings.with_(**changes))
        other.__dict__.update({k: v for k, v in self.__dict__.items() if k in ("registry", "redis")})
        other.__dict__.pop("ports", None)
        return other

    @cached_property
    def ports(self) -> Ports:
        """The domain's ports on the real servers (see :mod:`dm.ports`)."""
        from dm.adapters.celery_dispatch import CeleryDispatcher
        from dm.adapters.mongo import MongoDeployments
        from dm.adapters.redis_fleet import RedisFleet
        from dm.node_manager import NodeManager

        return Ports(
            settings=self.settings,
            store=MongoDeployments(self.registry),
            nodes=self.registry,
            catalogue=self,
            fleet=RedisFleet(self.redis),
            dispatcher=CeleryDispatcher(self.redis, self.settings),
            provider=NodeManager(self),
            is_outage=is_outage,
        )

    @cached_property
    def redis(self) -> redis.Redis:
        self.settings.require_servers()
        return redis_client(self.settings.redis_url)


_control: Control | None = None


def get_control() -> Control:
    """The process-wide control context, built from the environment on first use."""
    global _control
    if _control is None:
        from dm.app import settings

        _control = Control(settings)
        _control.registry.ensure_indexes()
    return _control
