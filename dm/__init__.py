"""dm: a deployment manager for algorithms, built on Celery.

``from dm import deploy`` then ``deploy.delay("hello", args={...})``;
``celery -A dm worker -Q dm.control`` runs the control plane.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["app", "deploy", "stop"]

if TYPE_CHECKING:
    from celery import Celery

    app: Celery
    deploy: Any
    stop: Any


def __getattr__(name: str) -> Any:
    # imported lazily, so the pure modules (balancer, package, models) load without Celery
    if name in ("app", "celery"):
        from dm.app import app

        return app
    if name in ("deploy", "stop"):
        from dm import tasks

        return getattr(tasks, name)
    raise AttributeError(f"module 'dm' has no attribute {name!r}")
