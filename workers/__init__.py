"""The node agent: a Celery worker bound to its node's queue, a metrics publisher and a supervisor."""
