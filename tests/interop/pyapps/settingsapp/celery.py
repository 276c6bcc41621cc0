"""An app whose settings come from the environment, so that one app serves
every case of test_python_settings.py:

- SETTINGSAPP_CONF: a JSON object of settings (new-style names);
- SETTINGSAPP_DJANGO: the same, but given Django-style (``CELERY_<NAME>``
  attributes read with ``namespace="CELERY"``);
- SETTINGSAPP_TASK: a JSON object of options for the task ``settingsapp.strict``;
- SETTINGSAPP_INIT_SLEEP: seconds each task process's worker_process_init takes.
"""

import json
import os
import time
import types

from celery import Celery, signals

app = Celery("settingsapp")
app.conf.broker_url = os.environ.get("SETTINGSAPP_BROKER", "amqp://guest:guest@127.0.0.1:1//")
app.conf.result_backend = os.environ.get("SETTINGSAPP_BACKEND", "redis://127.0.0.1:6379/0")
app.conf.task_default_queue = os.environ.get("SETTINGSAPP_QUEUE", "settingsapp")
app.conf.update(json.loads(os.environ.get("SETTINGSAPP_CONF") or "{}"))
if os.environ.get("SETTINGSAPP_DJANGO"):
    settings = {f"CELERY_{k.upper()}": v for k, v in json.loads(os.environ["SETTINGSAPP_DJANGO"]).items()}
    app.config_from_object(types.SimpleNamespace(**settings), namespace="CELERY")


@app.task(name="settingsapp.add")
def add(x, y):
    return x + y


@app.task(name="settingsapp.strict", **json.loads(os.environ.get("SETTINGSAPP_TASK") or "{}"))
def strict():
    return "ran"


@signals.worker_process_init.connect
def slow_start(**kwargs):
    time.sleep(float(os.environ.get("SETTINGSAPP_INIT_SLEEP") or 0))
