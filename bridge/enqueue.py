"""``dm.deploy`` tasks for a batch of deployments, in one Redis round trip (see :mod:`dm.sender`)."""

from __future__ import annotations

from typing import Any

from celery import Celery

from dm import constants as c
from dm.registry import Doc
from dm.sender import TaskSender

#: the Celery task the bridge sends for each recorded deployment
DEPLOY_TASK = "dm.deploy"


class DeployTasks:
    def __init__(self, app: Celery, queue: str = c.CONTROL_QUEUE) -> None:
        self.sender, self.queue = TaskSender(app), queue

    @staticmethod
    def kwargs(doc: Doc) -> dict[str, Any]:
        return {"algorithm": doc["algorithm"], "deployment_id": doc["_id"]}

    def send(self, deployments: list[Doc]) -> None:
        """Queue ``dm.deploy`` for each deployment, in order."""
        self.sender.send([(DEPLOY_TASK, self.queue, (), self.kwargs(doc), None) for doc in deployments])
