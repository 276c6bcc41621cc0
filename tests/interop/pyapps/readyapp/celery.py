"""An app whose worker_ready handler starts a thread (a metrics server, say)
and notes where it runs."""

import os
import threading
import time

from celery import Celery, signals

app = Celery("readyapp")
app.conf.broker_url = os.environ.get("READYAPP_BROKER", "amqp://guest:guest@127.0.0.1:5672//")
app.conf.result_backend = os.environ.get("READYAPP_BACKEND", "redis://127.0.0.1:6379/0")
app.conf.task_default_queue = os.environ.get("READYAPP_QUEUE", "readyapp")


@app.task(name="readyapp.add")
def add(x, y):
    return x + y


@signals.worker_ready.connect
def serve_metrics(sender=None, **kwargs):
    threading.Thread(target=time.sleep, args=(3600,), daemon=True, name="metrics").start()
    with open(os.environ["READYAPP_NOTE"], "w") as f:
        f.write(f"{os.getpid()} {threading.active_count()}")


@signals.worker_shutting_down.connect
def note_shutting_down(sender=None, how=None, **kwargs):
    with open(os.environ["READYAPP_NOTE"], "a") as f:
        f.write(f" shutting-down:{how} {os.getpid()}")


@signals.worker_shutdown.connect
def note_shutdown(sender=None, **kwargs):
    with open(os.environ["READYAPP_NOTE"], "a") as f:
        f.write(f" shutdown {os.getpid()}")
