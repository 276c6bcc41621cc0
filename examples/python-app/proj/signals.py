"""Signal receivers that append one JSON line per signal to the file named by
PROJ_SIGNAL_LOG (nothing happens when it is not set).

Each line: {"signal", "task_id", "task", "pid", "role", "time", ...details}. ``role``
is "main" in the process that received ``worker_init`` (Celery's MainProcess),
"child" in a process that received ``worker_process_init`` (a pool process),
and "other" anywhere else."""

import json
import os
import time

from celery import signals

_LOG = os.environ.get("PROJ_SIGNAL_LOG")
_main_pid = None
_in_child = False


def _role():
    if _main_pid is not None and os.getpid() == _main_pid:
        return "main"
    return "child" if _in_child else "other"


def _write(signal, task_id=None, task=None, **details):
    if not _LOG:
        return
    line = {"signal": signal, "task_id": task_id, "task": task, "pid": os.getpid(), "role": _role(),
            "time": time.time(), **details}
    data = (json.dumps(line, default=repr) + "\n").encode()
    fd = os.open(_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)  # one write on an O_APPEND file: lines from several processes do not interleave
    finally:
        os.close(fd)


def _exc(exc):
    return {"exc_type": f"{type(exc).__module__}.{type(exc).__qualname__}", "exc": str(exc)}


def _name(sender):
    return getattr(sender, "name", None)


@signals.worker_init.connect
def on_worker_init(sender=None, **kwargs):
    global _main_pid
    _main_pid = os.getpid()
    _write("worker_init")


@signals.worker_process_init.connect
def on_worker_process_init(sender=None, **kwargs):
    global _in_child
    _in_child = True
    _write("worker_process_init")


@signals.worker_process_shutdown.connect
def on_worker_process_shutdown(sender=None, pid=None, exitcode=None, **kwargs):
    _write("worker_process_shutdown", exitcode=exitcode)


@signals.worker_ready.connect
def on_worker_ready(sender=None, **kwargs):
    _write("worker_ready")


@signals.worker_shutdown.connect
def on_worker_shutdown(sender=None, **kwargs):
    _write("worker_shutdown")


@signals.task_prerun.connect
def on_task_prerun(sender=None, task_id=None, task=None, args=None, kwargs=None, **extra):
    _write("task_prerun", task_id, _name(task))


@signals.task_postrun.connect
def on_task_postrun(sender=None, task_id=None, task=None, state=None, **extra):
    _write("task_postrun", task_id, _name(task), state=state)


@signals.task_success.connect
def on_task_success(sender=None, result=None, **extra):
    _write("task_success", sender.request.id, _name(sender), result_type=type(result).__name__)


@signals.task_failure.connect
def on_task_failure(sender=None, task_id=None, exception=None, **extra):
    _write("task_failure", task_id, _name(sender), **_exc(exception))


@signals.task_retry.connect
def on_task_retry(sender=None, request=None, reason=None, **extra):
    _write("task_retry", request.id, _name(sender), reason=str(reason), retries=request.retries)


@signals.task_revoked.connect
def on_task_revoked(sender=None, request=None, terminated=None, signum=None, expired=None, **extra):
    _write("task_revoked", request.id, _name(sender), terminated=terminated,
           signum=None if signum is None else int(signum), expired=expired)
