"""The app of benches/python_tasks.py, run unchanged by `celery -A benchapp
worker` and by `celeriac -A benchapp worker`. It imports a few sizeable
libraries at import time, as real projects do (web framework, schema
validation, YAML), so that memory sharing between processes shows."""

import os

import jsonschema  # noqa: F401
import tornado.web  # noqa: F401
import yaml  # noqa: F401
from celery import Celery

app = Celery("benchapp", broker=os.environ.get("BENCH_BROKER", "amqp://guest:guest@127.0.0.1:5672//"))
app.conf.worker_hijack_root_logger = True


@app.task(name="bench.noop", ignore_result=True)
def noop():
    return None


@app.task(name="bench.work", ignore_result=True)
def work(n=27000):
    """About 1 ms of pure-Python work on this machine."""
    total = 0
    for i in range(n):
        total += i * i % 7
    return total
