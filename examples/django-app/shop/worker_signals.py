"""Worker signal receivers of the `shop` project.

``check_database`` is the check many Django projects run when a worker
starts: it fails the start early when the database is unreachable. It runs in
the worker's main process, before the pool forks, and leaves that process's
connection open (Celery's Django fixup makes each pool process drop what it
inherited).

When SHOP_SIGNAL_LOG names a file, the receivers also append one JSON line
per worker signal to it: {"signal", "pid", "time", ...}. The differential
tests read it."""

import json
import logging
import os
import time

from celery import signals
from django.db import connection

logger = logging.getLogger(__name__)

_LOG = os.environ.get("SHOP_SIGNAL_LOG")

# Set by check_database in the main process; pool processes inherit it.
MAIN_BACKEND_PID = None


def _write(signal, **details):
    if not _LOG:
        return
    line = {"signal": signal, "pid": os.getpid(), "time": time.time(), **details}
    fd = os.open(_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(line, default=repr) + "\n").encode())
    finally:
        os.close(fd)


@signals.worker_init.connect
def check_database(sender=None, **kwargs):
    global MAIN_BACKEND_PID
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid(), current_setting('server_version_num')::int")
            MAIN_BACKEND_PID, version = cursor.fetchone()
    except Exception as exc:
        _write("worker_init", db_check=f"{type(exc).__name__}: {exc}")
        raise
    logger.info("database reachable: PostgreSQL %s (backend %s)", version, MAIN_BACKEND_PID)
    _write("worker_init", db_check="ok", server_version_num=version)


@signals.worker_process_init.connect
def on_worker_process_init(sender=None, **kwargs):
    _write("worker_process_init")


@signals.worker_ready.connect
def on_worker_ready(sender=None, **kwargs):
    _write("worker_ready")
