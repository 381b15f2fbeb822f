"""What a control-plane process holds: settings, the registry and Redis, made once."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import redis

from dm.fleet import redis_client
from dm.registry import Registry
from dm.settings import Settings


@dataclass
class Control:
    settings: Settings

    @cached_property
    def registry(self) -> Registry:
        self.settings.require_servers()
        registry = Registry(self.settings.mongo_url, self.settings.database)
        return registry

    def with_settings(self, **changes: object) -> Control:
        """A context with changed settings that shares this one's connections."""
        other = Control(self.settings.with_(**changes))
        other.__dict__.update({k: v for k, v in self.__dict__.items() if k in ("registry", "redis")})
        return other

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
