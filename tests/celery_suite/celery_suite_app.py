"""The Celery app an external worker runs for Celery's integration suite
(`celery -A celery_suite_app worker` / `celeriac -A celery_suite_app worker`).

It is the app the suite's session fixtures build in the test process, made
importable by a worker: the test-app defaults of celery.contrib.testing, the
suite's settings, its task module and its class-based task. The broker and the
result backend come from TEST_BROKER and TEST_BACKEND, the variables the
suite's own conftest reads, so the worker and the tests always agree."""

import os

from celery.contrib.testing.app import TestApp

app = TestApp(
    name="celery.tests",
    enable_logging=True,
    config={
        "broker_url": os.environ["TEST_BROKER"],
        "result_backend": os.environ["TEST_BACKEND"],
        "result_extended": True,
        "task_create_missing_queues": False,
        # The testing defaults turn AMQP heartbeats off (0) for the worker in the test process;
        # celeriac refuses 0 at startup (docs/python-apps.md: it cannot turn them off). No test
        # depends on them: both external workers get Celery's default instead.
        "broker_heartbeat": 120,
    },
)

# Importing the suite's task module registers its shared tasks and its custom
# remote-control commands; the class-based task is registered by hand, as the
# suite's celery_class_tasks fixture does for the embedded worker. The tasks'
# own Redis keys go to the backend's db (celery_suite_redis.py).
from t.integration import tasks as suite_tasks  # noqa: E402

from celery_suite_redis import use_backend_db  # noqa: E402

app.register_task(suite_tasks.ClassBasedAutoRetryTask)
use_backend_db(suite_tasks)
