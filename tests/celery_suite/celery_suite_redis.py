"""The Redis connection the suite's tasks and tests use for their own keys.

The suite's task module connects to Redis db 0 for the keys its tasks write
and its tests read (echo lists, counters, a chord's header results). Here that
connection goes to the result backend's own db (TEST_BACKEND), in the worker
(celery_suite_app.py) and in the test process (celery_suite_plugin.py) alike,
so a run touches no db but its own and can start from an empty one."""

import os

from redis import StrictRedis


def connection():
    # Blocking reads in the suite wait longer than a socket timeout would allow.
    return StrictRedis.from_url(os.environ["TEST_BACKEND"], socket_timeout=None)


def use_backend_db(tasks_module):
    tasks_module.get_redis_connection = connection
