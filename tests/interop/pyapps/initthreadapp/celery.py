"""An app whose import is clean but whose worker_init receiver starts a
thread (a connection pool opened at startup, say)."""

import threading
import time

from celery import Celery
from celery.signals import worker_init

app = Celery("initthreadapp")


@worker_init.connect
def start_pool(**kwargs):
    threading.Thread(target=time.sleep, args=(600,), daemon=True, name="pool-worker").start()
