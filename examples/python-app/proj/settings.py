"""Celery settings, Django style: every name carries the CELERY_ prefix and is
read by ``app.config_from_object("proj.settings", namespace="CELERY")``.

Broker, backend and queue come from the environment so that a deployment (or
a test) can point them elsewhere without editing this file."""

import os

CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "amqp://guest:guest@localhost:5672//")
CELERY_RESULT_BACKEND = os.environ.get("CELERY_RESULT_BACKEND", "redis://localhost:6379/0")
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True

# Where .delay() sends tasks, and what `celery -A proj worker` consumes without -Q.
CELERY_TASK_DEFAULT_QUEUE = os.environ.get("PROJ_TASK_QUEUE", "proj")

CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_TIMEZONE = "UTC"
CELERY_ENABLE_UTC = True
CELERY_RESULT_EXPIRES = 3600
