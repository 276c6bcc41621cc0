"""Runs the same task requests through Celery's tracer and through celeriac's lean trace
path (`celeriac._lean`), in one process, as a task process would, and prints what each
call did as one JSON document: what the tracer returned, the traceback it kept, the
signals sent (in order, with what they carried), the document stored in Redis and the
request and task stacks afterwards. Run by test_lean_trace.py in a process of its own
(it imports the example project and connects receivers).

Usage: python lean_compare.py <queue for retries>"""

import json
import logging
import os
import re
import sys
import uuid

QUEUE = sys.argv[1]
os.environ["PROJ_TASK_QUEUE"] = QUEUE
os.environ.pop("PROJ_SIGNAL_LOG", None)

from celery import signals  # noqa: E402
from celery._state import _task_stack  # noqa: E402
from celery.app import trace  # noqa: E402
from celery.app.trace import build_tracer  # noqa: E402

from celeriac import _lean, _worker  # noqa: E402
from proj.celery import app  # noqa: E402

HOST = "lean@compare"
_worker._hostname = HOST
app.loader.import_default_modules()
app.finalize(auto=True)
# What celeriac's load does before it builds the tracers.
logging.getLogger("celery.app.trace").setLevel(logging.CRITICAL + 1)
trace.setup_worker_optimizations(app, HOST)
app.set_current()

SIGNALS = ("task_prerun", "task_postrun", "task_success", "task_failure", "task_retry", "task_internal_error")
seen = []


def receiver(name):
    def record(sender=None, **kw):
        entry = {"signal": name, "sender": getattr(sender, "name", None)}
        for key in ("task_id", "state", "args", "kwargs"):
            if key in kw:
                entry[key] = kw[key]
        for key in ("retval", "result", "exception", "reason"):
            if key in kw:
                entry[key] = repr(kw[key])
        einfo = kw.get("einfo")
        if einfo is not None:
            entry["einfo"] = einfo.traceback
        request = kw.get("request")
        if request is not None:
            entry["request"] = {k: repr(v) for k, v in sorted(vars(request).items())}
        task = app.current_task
        entry["current_task"] = getattr(task, "name", None)
        entry["request_id"] = getattr(getattr(task, "request", None), "id", None)
        seen.append(entry)
    return record


for name in SIGNALS:
    getattr(signals, name).connect(receiver(name), weak=False)


class AfterReturn(app.Task):
    """A task class with a hook of its own: every call through Celery's tracer."""

    def after_return(self, *args, **kwargs):
        pass


@app.task(name="lean.after_return", base=AfterReturn)
def after_return_task():
    return 1


class Unreadable(app.Task):
    """A task whose track_started cannot be read: the lean path is refused, not the app."""

    @property
    def track_started(self):
        raise LookupError("track_started is not set here")


@app.task(name="lean.unreadable", base=Unreadable)
def unreadable_task():
    return 1


@app.task(name="lean.internal_error")
def internal_error_task():
    return 1


# An error outside the task's body, made deterministic: sending task_success fails for that
# task, in what Celery's tracer calls and in what the lean path took at build.
_real_send_success = signals.task_success.send


def _send_success(sender=None, **kw):
    if getattr(sender, "name", None) == "lean.internal_error":
        raise RuntimeError("the bookkeeping after the task failed")
    return _real_send_success(sender=sender, **kw)


trace.send_success = _send_success
signals.task_success.send = _send_success


def request(task_name, task_id, args, kwargs, **extra):
    """The request the bridge hands the tracer: celeriac._worker._request over the decoded
    message's parts, as the Rust side gives them."""
    headers = {
        "lang": "py", "task": task_name, "id": task_id, "shadow": None, "eta": None, "expires": None,
        "group": None, "group_index": None, "retries": 0, "timelimit": [None, None], "root_id": task_id,
        "parent_id": None, "argsrepr": repr(tuple(args)), "kwargsrepr": repr(kwargs), "origin": "gen1@client",
        "ignore_result": False, "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {},
    }
    headers.update(extra.pop("headers", {}))
    embed = {key: extra.pop(key, None) for key in ("callbacks", "errbacks", "chain", "chord")}
    headers.update(extra)
    message = {
        "headers": headers, "args": args, "kwargs": kwargs, "embed": embed,
        "properties": {"correlation_id": task_id, "reply_to": "reply", "delivery_mode": 2, "priority": 0,
                       "delivery_info": {"exchange": "", "routing_key": QUEUE}, "body_encoding": "base64",
                       "delivery_tag": "tag"},
        "delivery_info": {"exchange": "", "routing_key": QUEUE, "priority": 0, "redelivered": False},
    }
    return _worker._request(message)[0]


def stored(task, task_id):
    raw = task.backend.client.get(task.backend.get_key_for_task(task_id))
    if raw is None:
        return None
    doc = json.loads(raw)
    doc.pop("date_done", None)
    return doc


def call(tracer, task, task_id, args, kwargs, req):
    del seen[:]
    R, I, T, Rstr = tracer(task_id, args, kwargs, req)
    return {
        "state": None if I is None else I.state,
        "retval": repr(R) if I is None else repr(I.retval),
        "R_type": type(R).__name__,
        "Rstr": Rstr,
        "traceback": getattr(R, "traceback", None),
        "signals": list(seen),
        "stored": stored(task, task_id),
        "request_stack": len(task.request_stack),
        "task_stack": len(_task_stack),
    }


CASES = {
    # name: (task, args, kwargs, request extras, the lean path runs the call itself)
    "success_stored": ("proj.billing.tasks.add", [2, 3], {}, {}, True),
    "success_ignored_by_the_request": ("proj.billing.tasks.add", [2, 3], {}, {"ignore_result": True}, True),
    "success_ignore_result_task": ("proj.limits.tasks.fire_and_forget", [21], {}, {}, True),
    "request_seen_by_the_task": ("proj.ops.tasks.whoami", [1, "x"], {"k": 2},
                                 {"headers": {"x_proj_tenant": "acme"}, "timelimit": [30, 20]}, True),
    "failure": ("proj.billing.tasks.charge", ["4242", "5.00"], {}, {}, True),
    "failure_ignored_result": ("proj.billing.tasks.charge", ["4242", "5.00"], {}, {"ignore_result": True}, True),
    "retry": ("proj.ops.tasks.flaky", [2], {}, {}, True),
    "retries_exhausted": ("proj.ops.tasks.always_down", [], {}, {"retries": 2}, True),
    "reject": ("proj.ops.tasks.reject_it", [], {}, {}, True),
    "ignore": ("proj.ops.tasks.ignore_it", [], {}, {}, True),
    "unencodable_result": ("proj.ops.tasks.unencodable", [], {}, {}, True),
    "unserializable_exception": ("proj.ops.tasks.unserializable_exc", [], {}, {}, True),
    "wrong_arguments": ("proj.billing.tasks.add", [1], {}, {}, True),
    "with_a_link": ("proj.billing.tasks.add", [2, 3], {},
                    {"callbacks": [{"task": "proj.billing.tasks.fire_and_forget", "args": [], "kwargs": {},
                                    "options": {"queue": QUEUE}, "subtask_type": None, "immutable": False}]},
                    False),
    "kwargs_not_a_mapping": ("proj.billing.tasks.add", [2, 3], None, {}, False),
    "track_started": ("proj.limits.tasks.tracked", [0], {}, {}, False),
    "track_started_result_ignored": ("proj.limits.tasks.tracked", [0], {}, {"ignore_result": True}, True),
    "internal_error": ("lean.internal_error", [], {}, {}, True),
}
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


def main():
    out = {"lean_tasks": {}, "cases": {}}
    hooks = {}
    for name, task in sorted(app.tasks.items()):
        if name.startswith("celery."):
            continue
        full = build_tracer(name, task, app.loader, HOST, app=app)
        calls = []

        def spy(*a, _full=full, _calls=calls):
            _calls.append(a[0])
            return _full(*a)

        lean, why = _lean.build(name, task, app, HOST, full)
        out["lean_tasks"][name] = why
        if lean is not None:
            # Count the calls the lean path hands to Celery's tracer unchanged.
            cells = dict(zip(lean.__code__.co_freevars, lean.__closure__))
            cells["full"].cell_contents = spy
        hooks[name] = (full, lean, calls)
    for case, (name, args, kwargs, extra, lean_runs) in CASES.items():
        full, lean, calls = hooks[name]
        task = app.tasks[name]
        sides = {}
        for side, tracer in (("celery", full), ("lean", lean)):
            task_id = str(uuid.uuid4())
            req = request(name, task_id, list(args), kwargs if kwargs is None else dict(kwargs), **extra)
            del calls[:]
            result = call(tracer, task, task_id, list(args), kwargs if kwargs is None else dict(kwargs), req)
            if side == "lean":
                result["handed_to_celery_tracer_first"] = bool(calls)
            text = json.dumps(result, default=repr).replace(task_id, "<id>")
            # Ids made during the call (a link's task): the same on both sides once named in order.
            made = list(dict.fromkeys(re.findall(UUID, text)))
            for i, other in enumerate(made):
                text = text.replace(other, f"<made{i}>")
            sides[side] = json.loads(text)
        sides["expected_lean"] = lean_runs
        out["cases"][case] = sides
    out["saferepr_none"] = __import__("celery.utils.saferepr", fromlist=["saferepr"]).saferepr(None, 1024)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
