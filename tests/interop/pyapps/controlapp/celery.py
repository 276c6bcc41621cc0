import os
import time

from celery import Celery
from celery.worker.control import control_command, inspect_command

app = Celery("controlapp")
app.conf.broker_url = os.environ.get("CONTROLAPP_BROKER", "amqp://guest:guest@127.0.0.1:5672//")
app.conf.result_backend = os.environ.get("CONTROLAPP_BACKEND", "redis://127.0.0.1:6379/0")
app.conf.task_default_queue = os.environ.get("CONTROLAPP_QUEUE", "controlapp")
app.conf.task_default_rate_limit = None
app.conf.result_expires = 3600
app.conf.worker_prefetch_multiplier = 1
app.conf.controlapp_motto = "roots first"

# What the app's control command changes and its inspect command reads, per process.
_dial = {"position": 0}


@inspect_command()
def app_motto(state, **kwargs):
    """Reads the app's own setting and the node name the handler is given."""
    return {"motto": state.app.conf.controlapp_motto, "node": state.hostname,
            "tasks": sorted(n for n in state.app.tasks if n.startswith("controlapp."))}


@control_command(args=[("by", int)], signature="<by>")
def turn_dial(state, by=1, **kwargs):
    """Changes state the next call sees: the handlers run in one long-lived process."""
    _dial["position"] += int(by)
    return {"ok": f"dial at {_dial['position']}"}


@inspect_command(visible=False)
def consumer_kind(state, **kwargs):
    """Reaches into the worker's consumer (celeriac has none: an intentional difference)."""
    return type(state.consumer).__name__ + ":" + type(state.consumer.pool).__name__


@control_command(visible=False)
def broken_handler(state, **kwargs):
    raise RuntimeError("broken on purpose")


@app.task(name="controlapp.add", rate_limit="10/s")
def add(x, y):
    return x + y


@app.task(name="controlapp.nap")
def nap(seconds):
    time.sleep(seconds)
    return seconds


@app.task(name="controlapp.plain")
def plain():
    return "plain"
