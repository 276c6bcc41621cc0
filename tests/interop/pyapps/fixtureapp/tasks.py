import os
import random
import threading
import time

from celery import shared_task

_hoard = []


@shared_task
def add(x, y):
    return x + y


@shared_task
def where():
    """The process, its thread count and a draw from `random`."""
    return {"pid": os.getpid(), "threads": threading.active_count(), "draw": random.random()}


@shared_task
def nap(seconds):
    time.sleep(seconds)
    return seconds


@shared_task
def hoard(mib):
    """Keeps `mib` MiB alive in this process."""
    _hoard.append(bytearray(os.urandom(1024)) * (mib * 1024))
    return os.getpid()


@shared_task
def exit_with(code):
    os._exit(code)


@shared_task
def mark_and_exit(path, code):
    """Appends a line to `path` (one per run), then exits the process at once."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.write(fd, b"ran\n")
    os._exit(code)


@shared_task(time_limit=1)
def overrun():
    time.sleep(30)


@shared_task
def chatty(word):
    """Logs through the task logger, as apps do."""
    from celery.utils.log import get_task_logger

    get_task_logger(__name__).warning("said %s", word)
    return word


@shared_task
def fails(why):
    raise ValueError(why)


class _Hooked(__import__("celery").Task):
    """A task class with an on_success of its own (so Celery's tracer runs every call)."""

    def on_success(self, retval, task_id, args, kwargs):
        with open(args[0], "a") as f:
            f.write(f"on_success {retval}\n")


@shared_task(base=_Hooked)
def hooked(path):
    return "hooked"
