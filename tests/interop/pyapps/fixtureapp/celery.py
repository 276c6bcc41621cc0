"""A small Celery app for celeriac's own tests of `celeriac -A` (the
differential suite against `celery worker` uses examples/python-app)."""

import os

from celery import Celery

app = Celery("fixtureapp")
app.conf.broker_url = os.environ.get("FIXTUREAPP_BROKER", "amqp://guest:guest@127.0.0.1:5672//")
app.conf.result_backend = os.environ.get("FIXTUREAPP_BACKEND", "redis://127.0.0.1:6379/0")
app.conf.task_default_queue = os.environ.get("FIXTUREAPP_QUEUE", "fixtureapp")
app.autodiscover_tasks(["fixtureapp"])
