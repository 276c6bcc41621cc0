"""The Python side of the benchmarks: a Celery app whose tasks have the same
names and behaviour as celeriac's built-ins."""

import os
import time

from celery import Celery

app = Celery("bench", broker=os.environ.get("BENCH_BROKER", "amqp://guest:guest@127.0.0.1:5672//"))
app.conf.worker_hijack_root_logger = True


@app.task(name="celeriac.noop", ignore_result=True)
def noop():
    return None


@app.task(name="celeriac.sleep")
def sleep(seconds):
    time.sleep(seconds)
    return seconds
