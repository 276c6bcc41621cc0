"""Operations: bound tasks that look at their request, retry, reject, ignore,
report progress, crash, or return what JSON cannot carry. Declared with the
app's own decorator."""

import os
import time

from celery.exceptions import Ignore, Reject

from proj.celery import app
from proj.errors import LedgerError, Receipt, TransientError

REQUEST_FIELDS = (
    "id", "task", "args", "kwargs", "retries", "eta", "expires", "hostname", "delivery_info",
    "correlation_id", "reply_to", "root_id", "parent_id", "group", "group_index", "chord", "chain",
    "callbacks", "errbacks", "origin", "shadow", "timelimit", "time_limit", "soft_time_limit",
    "called_directly", "is_eager", "ignore_result", "headers", "argsrepr", "kwargsrepr", "lang",
    "utc", "stamps", "stamped_headers", "replaced_task_nesting", "delivery_mode",
)


def jsonable(value):
    """JSON-able form; anything else as {"py_type": name, "repr": repr}."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    return {"py_type": type(value).__name__, "repr": repr(value)}


@app.task(bind=True)
def whoami(self, *args, **kwargs):
    """Dumps self.request: the fields a task can see, plus custom headers as attributes."""
    req = self.request
    dump = {name: jsonable(getattr(req, name, "<missing>")) for name in REQUEST_FIELDS}
    dump["custom_header_attr"] = jsonable(getattr(req, "x_proj_tenant", "<missing>"))
    props = getattr(req, "properties", None) or {}
    dump["properties"] = {k: jsonable(v) for k, v in sorted(props.items()) if k != "application_headers"}
    dump["current_task_is_self"] = app.current_task is not None and app.current_task.request.id == req.id
    return dump


@app.task(bind=True)
def flaky(self, succeed_at):
    """Retries (countdown 0.5 s) until it has retried `succeed_at` times."""
    if self.request.retries < succeed_at:
        raise self.retry(countdown=0.5, exc=TransientError(f"attempt {self.request.retries} failed"),
                         max_retries=3)
    return self.request.retries


@app.task(bind=True)
def always_down(self):
    """Retries twice, then the retry re-raises its exc."""
    raise self.retry(countdown=0.3, exc=TransientError("still down"), max_retries=2)


@app.task(bind=True, max_retries=1)
def retry_without_exc(self):
    """No exc given: MaxRetriesExceededError once max_retries is spent."""
    raise self.retry(countdown=0.2)


@app.task(autoretry_for=(KeyError,), retry_backoff=True, retry_backoff_max=10, retry_jitter=False, max_retries=2)
def lookup_rate(currency):
    """autoretry_for with exponential backoff, no jitter: countdowns 1 s then 2 s, then KeyError."""
    return {"EUR": 1.0}[currency]


@app.task
def reject_it():
    raise Reject("nope", requeue=False)


@app.task
def ignore_it():
    raise Ignore()


@app.task(bind=True)
def progress(self, seconds):
    self.update_state(state="PROGRESS", meta={"done": 1, "total": 2})
    time.sleep(seconds)
    return "finished"


@app.task
def crash():
    os._exit(3)


@app.task
def unencodable():
    return Receipt(7)


@app.task
def unserializable_exc():
    raise LedgerError(Receipt(8), "ledger closed")


@app.task
def sleepy(seconds):
    time.sleep(seconds)
    return seconds
