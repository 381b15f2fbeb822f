"""The servers behind the domain's ports (:mod:`dm.ports`): MongoDB (:mod:`.mongo`),
Redis (:mod:`.redis_fleet`), Celery (:mod:`.celery_dispatch`), and in memory for the unit
tests (:mod:`.memory`). Only these modules (and the registry, the fleet and the tasks they
wrap) import a server's client."""
