"""Differential tests for Python tasks: the example project examples/python-app
(`proj`, a Celery app as teams lay one out) run by `celery -A proj worker`
(Celery 5.7 prefork: the judge) and by `celeriac -A proj worker`, with the
same command line, each on a queue and node name of its own.

Every case runs on both workers at once and yields an *observation*: per task
id, the state and value the client's AsyncResult reports, the raw document in
Redis, the ordered signals the project's receivers logged (with the process
role: "main" = the process that got worker_init, "child" = a process that got
worker_process_init), and the events a Flower-like receiver got. After
normalizing what must differ (NORMALIZED below), celeriac's observation must
equal Celery's, except for INTENTIONAL_DIFFERENCES, each of which has a test
of its own.

`test_celery_baseline[...]` asserts the expected values on Celery's
observation alone, so the harness is proven without celeriac. Observations
are computed once per case (both workers in parallel) and shared by the tests.

Run: .venv/bin/python -m pytest -q tests/interop/test_python_tasks.py"""

import copy
import datetime
import decimal
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import amqp
import pytest
from celery import chord, group

from conftest import REDIS_URL, amqp_channel
from pyapp_harness import (
    PROGRAMS, Normalizer, Side, EventCapture, canonical_events, clean_env, describe, describe_differences,
    differences, postrun_seen,
)

ADD = "proj.billing.tasks.add"
TSUM = "proj.billing.tasks.tsum"
ROUNDTRIP = "proj.billing.tasks.roundtrip"
CHARGE = "proj.billing.tasks.charge"
WHOAMI = "proj.ops.tasks.whoami"
FLAKY = "proj.ops.tasks.flaky"
ALWAYS_DOWN = "proj.ops.tasks.always_down"
RETRY_WITHOUT_EXC = "proj.ops.tasks.retry_without_exc"
LOOKUP_RATE = "proj.ops.tasks.lookup_rate"
REJECT_IT = "proj.ops.tasks.reject_it"
IGNORE_IT = "proj.ops.tasks.ignore_it"
PROGRESS = "proj.ops.tasks.progress"
CRASH = "proj.ops.tasks.crash"
UNENCODABLE = "proj.ops.tasks.unencodable"
UNSERIALIZABLE_EXC = "proj.ops.tasks.unserializable_exc"
SLEEPY = "proj.ops.tasks.sleepy"
FANOUT = "proj.orchestration.tasks.fanout"
RELAY = "proj.orchestration.tasks.relay"
LATE_ACK = "proj.limits.tasks.late_ack"
EARLY_ACK = "proj.limits.tasks.early_ack"
FIRE_AND_FORGET = "proj.limits.tasks.fire_and_forget"
HARD_LIMITED = "proj.limits.tasks.hard_limited"
SOFT_CAUGHT = "proj.limits.tasks.soft_caught"
SOFT_UNCAUGHT = "proj.limits.tasks.soft_uncaught"
THROTTLED = "proj.limits.tasks.throttled"
TRACKED = "proj.limits.tasks.tracked"
TYPED = "proj.limits.tasks.typed"


# --- what is normalized, and what differs on purpose -----------------------------------------

# Replaced in both observations before comparing (they must differ between two workers, or
# between two runs of the same worker): see pyapp_harness.Normalizer and canonical_events.
NORMALIZED = (
    "task and group ids, AMQP reply_to/correlation ids: <idN> in order of appearance",
    "the node name (<node>) and queue name (<queue>), different per worker",
    "pids: signal lines' pid, `pid` fields (STARTED meta), `gen<pid>@` origins of tasks sent from a worker",
    "date-times of date_done, eta and expires: <datetime+tz> / <datetime>; event timestamps, runtime, clock, "
    "utcoffset, local_received, pid and hostname fields: dropped",
    "billiard's job number in WorkerLostError messages (`Job: <n>.`)",
    "events of a retried task in attempt order (Celery sends the retry's task-received before the previous "
    "attempt's task-retried more often than not: a race between its child and its parent)",
    "retry countdowns (task_prerun to the retry's eta) rounded to 0.1 s, and a rate limit reduced to "
    "`4 task-started spread over 1.2-3.5 s`",
    "after a hard time limit, the child's task_postrun(state=None): Celery sends SIGTERM and SIGKILL 0.1 s later, "
    "so whether the child gets to run it is a race",
    "after revoke(terminate=True), the order of the parent's task_revoked and the child's task_postrun",
    "a chord body's parent_id (and root_id, for a chord sent by a client): the header task that finished last, "
    "a race when two processes run the header",
)


def _parent_duty_roles(case_signals):
    def apply(case, kind, obs):
        wanted = case_signals[case]
        expected = INTENTIONAL_DIFFERENCES["parent-duties-in-a-task-process"][kind]
        found, problems = 0, []
        for t in obs["tasks"]:
            for s in t["signals"]:
                if s["signal"] == wanted:
                    found += 1
                    if s["role"] == expected:
                        s["role"] = "main (celery) | child (celeriac)"
                    else:
                        problems.append(f"{wanted} fired in role {s['role']!r}, expected {expected!r}")
        if not found:
            problems.append(f"no {wanted} signal")
        return problems
    return apply


def _lost_process_traceback(case, kind, obs):
    problems, found = [], 0
    for t in obs["tasks"]:
        for e in t["events"]:
            if e.get("type") != "task-failed":
                continue
            found += 1
            tb = e.get("traceback") or ""
            from_pool = "billiard/pool.py" in tb or "celery/worker/request.py" in tb
            if kind == "celery" and not from_pool:
                problems.append(f"Celery's traceback is not from its pool: {tb!r}")
            if kind == "celeriac" and "billiard/pool.py" in tb:
                problems.append(f"celeriac's traceback names billiard's pool: {tb!r}")
            lines = tb.strip().splitlines()
            # The exception's class; how billiard and celeriac print its arguments differs.
            last = lines[-1].split(":")[0] if lines else ""
            e["traceback"] = f"<traceback ending {last!r}>"
            exc = e.get("exception") or ""
            if kind == "celery" and exc != "ExceptionWithTraceback()":
                problems.append(f"Celery's event exception is {exc!r}, not its pickled wrapper")
            if kind == "celeriac" and not exc.startswith(("WorkerLostError(", "TimeLimitExceeded(")):
                problems.append(f"celeriac's event exception is {exc!r}")
            e["exception"] = "<the lost task's exception>"
    # Celery reports a hard time limit twice (billiard's on_hard_timeout and
    # the Request's on_timeout): one task-failed event and one task_failure
    # signal per report; celeriac reports it once.
    for t in obs["tasks"]:
        for key, same in (("events", lambda x: x.get("type") == "task-failed"),
                          ("signals", lambda x: x.get("signal") == "task_failure")):
            items, kept = t[key], []
            for item in items:
                if same(item) and kept and kept[-1] == item:
                    if kind == "celeriac":
                        problems.append(f"celeriac repeated {item}")
                    continue
                kept.append(item)
            t[key] = kept
    if not found:
        problems.append("no task-failed event")
    return problems


def _events_may_be_lost(case, kind, obs):
    problems = []
    early = ("task-received", "task-started")
    for t in obs["tasks"]:
        types = [e.get("type") for e in t["events"]]
        if kind == "celery" and types[:2] != list(early):
            problems.append(f"Celery's events do not start with {early}: {types}")
        if "task-failed" not in types:
            problems.append(f"no task-failed on {kind}: {types}")
        t["events"] = [e for e in t["events"] if e.get("type") not in early]
    return problems


def _terminate_postrun(case, kind, obs):
    problems = []
    for t in obs["tasks"]:
        postruns = [s for s in t["signals"] if s["signal"] == "task_postrun"]
        if kind == "celeriac" and postruns:
            problems.append(f"celeriac ran task_postrun after a terminate: {postruns}")
        if kind == "celery" and [p.get("state") for p in postruns] != [None]:
            problems.append(f"Celery's child did not run task_postrun(state=None) once: {postruns}")
        t["signals"] = [s for s in t["signals"] if s["signal"] != "task_postrun"]
    return problems


_PARENT_DUTY_SIGNALS = {
    "reject": "task_failure",
    "process_exit": "task_failure",
    "hard_time_limit": "task_failure",
    "revoke_before_start": "task_revoked",
    "revoke_expired": "task_revoked",
    "revoke_terminate": "task_revoked",
}

# Every difference celeriac has on purpose. Each is asserted, both ways, by
# test_intentional_difference, and reconciled before test_same_outcome compares.
INTENTIONAL_DIFFERENCES = {
    "parent-duties-in-a-task-process": {
        "why": "Celery's MainProcess fires task_failure for Reject(requeue=False), a hard time limit and a lost "
               "process, and task_revoked, because its parent settles those tasks. celeriac's supervisor runs no "
               "Python: the task process running the bridge or settling the lost record fires them "
               "(docs/design/python-tasks.md 4.3, 4.5).",
        "cases": tuple(_PARENT_DUTY_SIGNALS),
        "celery": "main",
        "celeriac": "child",
        "apply": _parent_duty_roles(_PARENT_DUTY_SIGNALS),
    },
    "lost-process-traceback": {
        "why": "The task-failed event of a process that died or hit the hard limit carries, in Celery, a "
               "traceback of billiard's pool (mark_as_worker_lost, on_hard_timeout) or of the worker's "
               "Request.on_timeout: frames celeriac has no equivalent for (compared by the exception class "
               "of the last line), and `exception: 'ExceptionWithTraceback()'`, billiard's pickling wrapper, "
               "where celeriac sends the exception's repr. Celery reports a hard time limit twice (two "
               "task-failed events, two task_failure signals); celeriac once.",
        "cases": ("process_exit", "hard_time_limit"),
        "celery": "billiard/celery worker frames",
        "celeriac": "no billiard frames",
        "apply": _lost_process_traceback,
    },
    "events-of-a-process-that-exits-at-once": {
        "why": "Celery's main process sends task-received and task-started before its child runs the task. "
               "A celeriac task process sends its own events in batches, a few milliseconds behind, so a "
               "task that ends its process at once (os._exit) may take them along; task-failed, sent by "
               "the process that settles the death, always arrives and monitors show FAILURE either way. "
               "Flushing before every task would cost about 25 us of CPU per task with -E (measured with "
               "benches/python_tasks.py).",
        "cases": ("process_exit",),
        "celery": "task-received, task-started, task-failed",
        "celeriac": "[task-received, task-started,] task-failed",
        "apply": _events_may_be_lost,
    },
    "terminate-kills-the-process": {
        "why": "revoke(terminate=True) makes Celery's parent send SIGTERM, which billiard turns into SystemExit "
               "in the child, so the child still runs task_postrun(state=None). SIGTERM means 'drain' to a "
               "celeriac task process, so celeriac kills it with SIGKILL: no task_postrun.",
        "cases": ("revoke_terminate",),
        "celery": "task_postrun(state=None) in the child",
        "celeriac": "no task_postrun",
        "apply": _terminate_postrun,
    },
}


def reconcile(case, kind, obs):
    """Applies every intentional difference that concerns `case`; returns the problems found."""
    problems = []
    for name, diff in INTENTIONAL_DIFFERENCES.items():
        if case in diff["cases"]:
            problems += [f"{name}: {p}" for p in diff["apply"](case, kind, obs)]
    return problems


# --- the two workers ------------------------------------------------------------------------

class Pair:
    """celery and celeriac, started together, with the same app, arguments and backend."""

    def __init__(self, tmp, events, backend, otel=False):
        self.sides = {kind: Side(kind, tmp, events, backend, otel) for kind in PROGRAMS}
        self.executors = {kind: ThreadPoolExecutor(1, thread_name_prefix=f"pyapp-{kind}") for kind in PROGRAMS}
        for side in self.sides.values():
            side.start()
        for side in self.sides.values():
            side.wait_ready()
        self.sides["celery"].require()  # the judge must run; celeriac's failure is reported per test

    def observe(self, case):
        """Runs the case on both sides at once. Each side's client is only ever used from one thread of
        its own: Celery's result backend is per thread, and an rpc:// reply queue is named after the
        thread's ident, which a new thread may reuse while the old consumer still holds the queue."""
        def one(side):
            try:
                run = side.run(case.name)
                raw = case.fn(run)
                return Observation(raw, Normalizer(side, run.seeds)(raw))
            except BaseException as e:  # noqa: BLE001 - handed to the test that needs it
                return e
        futures = {kind: self.executors[kind].submit(one, side) for kind, side in self.sides.items()}
        return {kind: f.result() for kind, f in futures.items()}

    def close(self):
        for executor in self.executors.values():
            executor.shutdown(wait=True)
        for side in self.sides.values():
            side.close()
        for side in self.sides.values():
            for delete in ("queue_delete", "exchange_delete"):  # a failed delete closes its channel
                with amqp_channel() as ch:
                    try:
                        getattr(ch, delete)(side.queue)
                    except amqp.exceptions.AMQPError:
                        pass


class Observation:
    def __init__(self, raw, normalized):
        self.raw = raw
        self.normalized = normalized


@pytest.fixture(scope="module")
def events():
    return EventCapture()


@pytest.fixture(scope="module")
def main_pair(events, tmp_path_factory):
    """Redis result backend: raw documents are compared too."""
    pair = Pair(tmp_path_factory.mktemp("pyapp-main"), events, REDIS_URL)
    yield pair
    pair.close()


@pytest.fixture(scope="module")
def aux_pair(events, tmp_path_factory):
    """rpc:// result backend, and OpenTelemetry in every pool process."""
    pair = Pair(tmp_path_factory.mktemp("pyapp-aux"), events, "rpc://", otel=True)
    yield pair
    pair.close()


_OBSERVED = {}


def observed(request, name):
    if name not in _OBSERVED:
        case = CASES[name]
        pair = request.getfixturevalue(f"{case.pair}_pair")
        _OBSERVED[name] = pair.observe(case)
    return _OBSERVED[name]


def side_of(obs, kind):
    value = obs[kind]
    if isinstance(value, BaseException):
        raise AssertionError(f"{kind} side failed: {value!r}") from value
    return value


# --- cases ----------------------------------------------------------------------------------

class Case:
    def __init__(self, name, fn, pair):
        self.name, self.fn, self.pair = name, fn, pair
        self.expect = None


CASES = {}


def case(pair="main"):
    def deco(fn):
        name = fn.__name__.removeprefix("case_")
        CASES[name] = Case(name, fn, pair)
        return fn
    return deco


def expect(name):
    def deco(fn):
        CASES[name].expect = fn
        return fn
    return deco


def sigs(task):
    """(signal, role) pairs of a task view, in order."""
    return [(s["signal"], s["role"]) for s in task["signals"]]


def types(task):
    return [e["type"] for e in task["events"]]


def ok_doc(value, task_id="<id0>"):
    return {"status": "SUCCESS", "result": value, "traceback": None, "children": [], "date_done": "<datetime+tz>",
            "task_id": task_id}


RAN_OK = [("task_prerun", "child"), ("task_success", "child"), ("task_postrun", "child")]
RAN_FAILED = [("task_prerun", "child"), ("task_failure", "child"), ("task_postrun", "child")]
OK_EVENTS = ["task-received", "task-started", "task-succeeded"]
FAILED_EVENTS = ["task-received", "task-started", "task-failed"]


def assert_plain_success(t, value):
    assert t["state"] == "SUCCESS" and t["result"] == value, t
    extra = {k: t["doc"][k] for k in ("children", "group_id", "group_index", "parent_id") if k in t["doc"]}
    assert t["doc"] == dict(ok_doc(t["doc"]["result"], t["id"]), **extra), t["doc"]
    assert sigs(t) == RAN_OK, sigs(t)
    assert types(t) == OK_EVENTS, types(t)


def assert_failed(t, exc_type, exc_module, exc_message, *, signals=RAN_FAILED, events=FAILED_EVENTS):
    assert t["state"] == "FAILURE", t
    doc = t["doc"]
    assert doc["status"] == "FAILURE" and doc["result"] == {"exc_type": exc_type, "exc_message": exc_message,
                                                             "exc_module": exc_module}, doc
    # The client does not import proj: Celery makes up the class, in celery.exceptions.
    client_module = "celery.exceptions" if exc_module == "proj.errors" else exc_module
    assert t["result"]["exception"] == f"{client_module}.{exc_type}", t["result"]
    assert sigs(t) == signals, sigs(t)
    assert types(t) == events, types(t)


AWARE = datetime.datetime(2025, 6, 7, 8, 9, 10, 111213, tzinfo=datetime.timezone.utc)
NAIVE = datetime.datetime(2025, 6, 7, 8, 9, 10)
VALUES = [AWARE, NAIVE, datetime.date(2025, 6, 7), datetime.time(8, 9, 10), decimal.Decimal("0.10"),
          uuid.UUID("87654321-4321-8765-4321-876543218765"), b"plain bytes", b"\x00\xff\xfe"]


@case()
def case_add(run):
    run.send(ADD, (2, 3))
    run.settle()
    return run.observe()


@expect("add")
def _(o):
    [t] = o["tasks"]
    assert_plain_success(t, 5)
    assert t["doc"]["result"] == 5
    assert t["events"][0] == {"type": "task-received", "uuid": "<id0>", "name": ADD, "args": "(2, 3)",
                              "kwargs": "{}", "root_id": "<id0>", "parent_id": None, "retries": 0, "eta": None,
                              "expires": None}, t["events"][0]
    assert t["events"][2] == {"type": "task-succeeded", "uuid": "<id0>", "result": "5"}, t["events"][2]


@case()
def case_request_dump(run):
    r = run.send(WHOAMI, (1, "x"), {"when": AWARE}, countdown=0.2, expires=60,
                 headers={"x_proj_tenant": "acme"}, priority=3, app_id="proj-client")
    run.settle()
    dump = r.get(timeout=5)
    eta, expires = (datetime.datetime.fromisoformat(dump[k]) for k in ("eta", "expires"))
    return run.observe(expires_minus_eta_s=round((expires - eta).total_seconds()))


@expect("request_dump")
def _(o):
    [t] = o["tasks"]
    assert o["expires_minus_eta_s"] == 60
    assert t["state"] == "SUCCESS" and sigs(t) == RAN_OK and types(t) == OK_EVENTS
    d = t["result"]
    assert d == {
        "id": "<id0>", "task": WHOAMI, "args": [1, "x"],
        "kwargs": {"when": {"py_type": "datetime", "repr": repr(AWARE)}},
        "retries": 0, "eta": "<datetime+tz>", "expires": "<datetime+tz>", "hostname": "<node>",
        "delivery_info": {"exchange": "", "routing_key": "<queue>", "priority": 3, "redelivered": False},
        "correlation_id": "<id0>", "reply_to": "<id1>", "root_id": "<id0>", "parent_id": None, "group": None,
        "group_index": None, "chord": None, "chain": None, "callbacks": None, "errbacks": None,
        "origin": d["origin"], "shadow": None, "timelimit": [None, None], "time_limit": None,
        "soft_time_limit": None, "called_directly": False, "is_eager": False, "ignore_result": None,
        "headers": {"x_proj_tenant": "acme"}, "argsrepr": "(1, 'x')", "kwargsrepr": f"{{'when': {AWARE!r}}}",
        "lang": "py", "utc": None, "stamps": {}, "stamped_headers": None, "replaced_task_nesting": 0,
        "delivery_mode": "<missing>", "custom_header_attr": "acme",
        "properties": {"app_id": "proj-client", "content_encoding": "utf-8", "content_type": "application/json",
                       "correlation_id": "<id0>", "delivery_mode": 2, "expiration": "60000", "priority": 3,
                       "reply_to": "<id1>"},
        "current_task_is_self": True,
    }, d
    assert d["origin"].startswith("gen<pid>@"), "the client's origin: this test process"
    assert t["events"][0]["eta"] == "<datetime+tz>" and t["events"][0]["expires"] == "<datetime+tz>"


@case()
def case_kombu_types(run):
    run.send(ROUNDTRIP, VALUES, {"due": VALUES[2], "amount": VALUES[4]})
    run.settle()
    return run.observe()


@expect("kombu_types")
def _(o):
    [t] = o["tasks"]
    assert t["state"] == "SUCCESS" and sigs(t) == RAN_OK and types(t) == OK_EVENTS
    r = t["result"]
    assert r["types"] == ["datetime", "datetime", "date", "time", "Decimal", "UUID", "bytes", "bytes"], r["types"]
    assert r["named_types"] == {"amount": "Decimal", "due": "date"}
    assert r["values"] == describe(VALUES), "each value came back as sent, with its type"
    assert r["named"] == describe({"due": VALUES[2], "amount": VALUES[4]})
    made = r["made"]
    assert made["aware"] == describe(datetime.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=datetime.timezone.utc))
    assert made["naive"] == describe(datetime.datetime(2026, 1, 2, 3, 4, 5))
    assert made["decimal"] == describe(decimal.Decimal("1234.5600"))
    assert made["uuid"] == describe(uuid.UUID("12345678-1234-5678-1234-567812345678"))
    assert made["bytes_binary"] == describe(b"\x00\xff\xfe") and made["bytes_utf8"] == describe(b"plain bytes")
    stored = t["doc"]["result"]
    # kombu's JSON envelopes, as stored in Redis
    assert stored["made"]["aware"] == {"__type__": "datetime", "__value__": "2026-01-02T03:04:05.678901+00:00"}
    assert stored["made"]["bytes_binary"] == {"__type__": "base64", "__value__": "AP/+"}
    assert stored["made"]["bytes_utf8"] == {"__type__": "bytes", "__value__": "plain bytes"}
    assert stored["made"]["uuid"] == {"__type__": "uuid", "__value__": {"hex": "12345678123456781234567812345678"}}
    assert stored["made"]["decimal"] == {"__type__": "decimal", "__value__": "1234.5600"}
    assert stored["made"]["time"] == {"__type__": "time", "__value__": "13:14:15.000016"}


def retry_countdowns(run, task_id):
    """Seconds from each attempt's task_prerun to the eta of the retry it sent (task-received's eta), to 0.1 s."""
    preruns = [s["time"] for s in run.side.signals(task_id) if s["signal"] == "task_prerun"]
    etas = [datetime.datetime.fromisoformat(e["eta"]).timestamp()
            for e in canonical_events(run.side.task_events(task_id)) if e["type"] == "task-received" and e.get("eta")]
    return [round(eta - start, 1) for start, eta in zip(preruns, etas)]


RETRIED_ATTEMPT = ["task-received", "task-started", "task-retried"]


@case()
def case_retry_then_success(run):
    r = run.send(FLAKY, (2,))
    run.settle()
    return run.observe(countdowns=retry_countdowns(run, r.id))


@expect("retry_then_success")
def _(o):
    [t] = o["tasks"]
    assert o["countdowns"] == [0.5, 0.5]
    assert t["state"] == "SUCCESS" and t["result"] == 2 and t["retries_signalled"] == 2
    assert types(t) == RETRIED_ATTEMPT * 2 + OK_EVENTS, types(t)
    retry = [("task_prerun", "child"), ("task_retry", "child"), ("task_postrun", "child")]
    assert sigs(t) == retry * 2 + RAN_OK, sigs(t)
    assert [s["reason"] for s in t["signals"] if s["signal"] == "task_retry"] == [
        "Retry in 0.5s: TransientError('attempt 0 failed')", "Retry in 0.5s: TransientError('attempt 1 failed')"]
    received = [e for e in t["events"] if e["type"] == "task-received"]
    assert [(e["retries"], e["parent_id"], e["eta"]) for e in received] == [
        (0, None, None), (1, "<id0>", "<datetime+tz>"), (2, "<id0>", "<datetime+tz>")]
    assert [s["state"] for s in t["signals"] if s["signal"] == "task_postrun"] == ["RETRY", "RETRY", "SUCCESS"]


@case()
def case_retry_exhausted(run):
    r = run.send(ALWAYS_DOWN)
    run.settle()
    return run.observe(countdowns=retry_countdowns(run, r.id))


@expect("retry_exhausted")
def _(o):
    [t] = o["tasks"]
    assert o["countdowns"] == [0.3, 0.3]
    retry = [("task_prerun", "child"), ("task_retry", "child"), ("task_postrun", "child")]
    assert_failed(t, "TransientError", "proj.errors", ["still down"], signals=retry * 2 + RAN_FAILED,
                  events=RETRIED_ATTEMPT * 2 + FAILED_EVENTS)
    assert t["result"]["str"] == "still down" and t["retries_signalled"] == 2
    assert [e["exception"] for e in t["events"] if e["type"] in ("task-retried", "task-failed")] == [
        "TransientError('still down')"] * 3


@case()
def case_retry_without_exc(run):
    run.send(RETRY_WITHOUT_EXC)
    run.settle()
    return run.observe()


@expect("retry_without_exc")
def _(o):
    [t] = o["tasks"]
    message = f"Can't retry {RETRY_WITHOUT_EXC}[<id0>] args:() kwargs:{{}}"
    retry = [("task_prerun", "child"), ("task_retry", "child"), ("task_postrun", "child")]
    assert_failed(t, "MaxRetriesExceededError", "celery.exceptions", [message], signals=retry + RAN_FAILED,
                  events=RETRIED_ATTEMPT + FAILED_EVENTS)
    retried = next(e for e in t["events"] if e["type"] == "task-retried")
    assert retried["exception"] == "None", "Celery's task-retried says 'None' when retry() got no exc"
    assert t["signals"][1]["reason"] == "Retry in 0.2s"


@case()
def case_autoretry_backoff(run):
    r = run.send(LOOKUP_RATE, ("USD",))
    run.settle(timeout=30)
    return run.observe(countdowns=retry_countdowns(run, r.id))


@expect("autoretry_backoff")
def _(o):
    [t] = o["tasks"]
    assert o["countdowns"] == [1.0, 2.0], "retry_backoff=True, no jitter: 1 s, then 2 s"
    retry = [("task_prerun", "child"), ("task_retry", "child"), ("task_postrun", "child")]
    assert_failed(t, "KeyError", "builtins", ["USD"], signals=retry * 2 + RAN_FAILED,
                  events=RETRIED_ATTEMPT * 2 + FAILED_EVENTS)
    assert [s["reason"] for s in t["signals"] if s["signal"] == "task_retry"] == [
        "Retry in 1s: KeyError('USD')", "Retry in 2s: KeyError('USD')"]


@case()
def case_custom_exception(run):
    run.send(CHARGE, ("4242", "5.00"))
    run.settle()
    return run.observe()


@expect("custom_exception")
def _(o):
    [t] = o["tasks"]
    assert_failed(t, "PaymentDeclined", "proj.errors", ["card 4242 declined for 5.00"])
    assert t["result"] == {"exception": "celery.exceptions.PaymentDeclined", "str": "card 4242 declined for 5.00",
                           "args": ["card 4242 declined for 5.00"]}
    failed = t["events"][2]
    assert failed["exception"] == "PaymentDeclined('card 4242 declined for 5.00')"
    assert failed["traceback"].endswith("proj.errors.PaymentDeclined: card 4242 declined for 5.00\n")
    assert t["doc"]["traceback"] == failed["traceback"]
    assert t["signals"][1]["exc_type"] == "proj.errors.PaymentDeclined"


@case()
def case_reject(run):
    run.send(REJECT_IT)
    run.settle()
    return run.observe()


@expect("reject")
def _(o):
    [t] = o["tasks"]
    assert_failed(t, "Reject", "celery.exceptions", ["nope", False],
                  signals=[("task_prerun", "child"), ("task_postrun", "child"), ("task_failure", "main")])
    assert t["signals"][1]["state"] == "REJECTED"
    assert t["events"][2]["exception"] == "reject requeue=False: nope", "a task-failed event, not task-rejected"


@case()
def case_ignore(run):
    run.send(IGNORE_IT)
    run.settle(until=postrun_seen)
    return run.observe()


@expect("ignore")
def _(o):
    [t] = o["tasks"]
    assert t["state"] == "PENDING" and t["doc"] is None
    assert sigs(t) == [("task_prerun", "child"), ("task_postrun", "child")] and t["signals"][1]["state"] == "IGNORED"
    assert types(t) == ["task-received", "task-started"], "no final event for an ignored task"


@case()
def case_update_state(run):
    r = run.send(PROGRESS, (1.0,))
    states = run.poll_states(r.id)
    run.settle()
    return run.observe(states=states)


@expect("update_state")
def _(o):
    [t] = o["tasks"]
    assert o["states"] == [{"status": "PROGRESS", "result": {"done": 1, "total": 2}},
                           {"status": "SUCCESS", "result": "finished"}], o["states"]
    assert_plain_success(t, "finished")


def chord_body_parent(obs, body, header):
    """NORMALIZED: a chord body's parent_id is the header task that finished last, and so is its
    root_id when the header tasks are roots: a race when the header runs in two processes at once."""
    for t in obs["tasks"]:
        if t["id"] != body:
            continue
        for holder in [t["doc"] or {}] + [e for e in t["events"] if e["type"] == "task-received"]:
            for key in ("parent_id", "root_id"):
                if holder.get(key) in header:
                    holder[key] = "<the chord header task that finished last>"
    return obs


@case()
def case_calls_other_tasks(run):
    r = run.send(FANOUT, (5,))
    run.settle()
    spawned = r.get(timeout=5)
    run.track(spawned["delay"], spawned["apply_async"], spawned["chain_first"], spawned["chain_last"],
              *spawned["group_members"], *spawned["chord_header"], spawned["chord_body"], spawned["whoami"])
    run.seed(spawned["group"])
    run.settle()
    return chord_body_parent(run.observe(spawned=spawned), spawned["chord_body"], spawned["chord_header"])


@expect("calls_other_tasks")
def _(o):
    fanout, *children = o["tasks"]
    assert fanout["state"] == "SUCCESS" and sigs(fanout) == RAN_OK and types(fanout) == OK_EVENTS
    assert o["spawned"] == {"delay": "<id1>", "apply_async": "<id2>", "chain_first": "<id3>", "chain_last": "<id4>",
                            "group_members": ["<id5>", "<id6>", "<id7>"], "chord_header": ["<id8>", "<id9>"],
                            "chord_body": "<id10>", "whoami": "<id11>", "group": "<id12>"}, o["spawned"]
    values = [c["result"] for c in children[:-1]]
    assert values == [6, 7, 8, 18, 5, 6, 7, 5, 6, 11], values
    for c in children:
        assert c["state"] == "SUCCESS" and sigs(c) == RAN_OK and types(c) == OK_EVENTS, c
    received = {c["id"]: c["events"][0] for c in children}
    assert all(e["root_id"] == "<id0>" for e in received.values()), received
    assert received["<id1>"]["parent_id"] == "<id0>" and received["<id4>"]["parent_id"] == "<id3>"
    assert received["<id2>"]["eta"] == "<datetime+tz>", "apply_async(countdown=0.2) from inside a task"
    who = children[-1]["result"]
    assert (who["parent_id"], who["root_id"], who["headers"]) == ("<id0>", "<id0>", {"x_proj_tenant": "acme"})
    assert who["origin"].startswith("gen<pid>@") and who["hostname"] == "<node>"
    assert who["ignore_result"] is False, "the task object's apply_async sets it, send_task does not"
    assert fanout["doc"]["children"], "the fanout's stored result lists the tasks it started"


@case()
def case_acks_late(run):
    late = run.send(LATE_ACK, (2.0,))
    early = run.send(EARLY_ACK, (2.0,))

    def both_active():
        replies = run.client.control.inspect(destination=[run.side.node], timeout=1.0).active() or {}
        active = {a["id"]: a for a in replies.get(run.side.node, [])}
        return active if late.id in active and early.id in active else None
    active = run.wait_for(both_active, timeout=15, what="both tasks in `inspect active`")
    run.settle()
    return run.observe(acknowledged_while_running={"late_ack": active[late.id]["acknowledged"],
                                                   "early_ack": active[early.id]["acknowledged"]})


@expect("acks_late")
def _(o):
    assert o["acknowledged_while_running"] == {"late_ack": False, "early_ack": True}
    late, early = o["tasks"]
    assert_plain_success(late, "acked late")
    assert_plain_success(early, "acked early")


@case()
def case_ignore_result(run):
    run.send(FIRE_AND_FORGET, (21,))
    run.settle()
    return run.observe()


@expect("ignore_result")
def _(o):
    [t] = o["tasks"]
    assert t["state"] == "PENDING" and t["doc"] is None, "ignore_result: nothing stored"
    assert sigs(t) == RAN_OK and types(t) == OK_EVENTS
    assert t["events"][2]["result"] == "42"


def drop_postrun_after_kill(obs):
    """NORMALIZED: the child's task_postrun(state=None) after a hard limit is a race in Celery."""
    for t in obs["tasks"]:
        t["signals"] = [s for s in t["signals"]
                        if not (s["signal"] == "task_postrun" and s.get("state") is None)]
    return obs


@case()
def case_hard_time_limit(run):
    run.send(HARD_LIMITED)
    run.settle()
    return drop_postrun_after_kill(run.observe())


@expect("hard_time_limit")
def _(o):
    [t] = o["tasks"]
    assert t["state"] == "FAILURE"
    assert t["doc"]["result"] == {"exc_type": "TimeLimitExceeded", "exc_message": [1],
                                  "exc_module": "billiard.exceptions"}, t["doc"]
    assert t["doc"]["traceback"] is None
    # Celery 5.7 fires task_failure twice and sends task-failed twice: once from the pool's
    # job callback, once from Request.on_timeout.
    assert sigs(t) == [("task_prerun", "child"), ("task_failure", "main"), ("task_failure", "main")], sigs(t)
    assert types(t) == ["task-received", "task-started", "task-failed", "task-failed"], types(t)
    assert [e["exception"] for e in t["events"][2:]] == ["ExceptionWithTraceback()"] * 2
    assert t["signals"][1]["exc"] == "TimeLimitExceeded(1,)"


@case()
def case_soft_time_limit_caught(run):
    run.send(SOFT_CAUGHT)
    run.settle()
    return run.observe()


@expect("soft_time_limit_caught")
def _(o):
    [t] = o["tasks"]
    assert_plain_success(t, "caught")


@case()
def case_soft_time_limit_uncaught(run):
    run.send(SOFT_UNCAUGHT)
    run.settle()
    return run.observe()


@expect("soft_time_limit_uncaught")
def _(o):
    [t] = o["tasks"]
    assert_failed(t, "SoftTimeLimitExceeded", "billiard.exceptions", [])
    assert t["events"][2]["exception"] == "SoftTimeLimitExceeded()"
    assert "time.sleep(10)" in t["events"][2]["traceback"], "interrupted in the task's own frame"


@case()
def case_rate_limit(run):
    results = [run.send(THROTTLED, (i,)) for i in range(4)]
    run.settle()
    started = sorted(e["timestamp"] for r in results for e in run.side.task_events(r.id)
                     if e["type"] == "task-started")
    spread = started[-1] - started[0] if len(started) == 4 else None
    return run.observe(rate_limited=spread is not None and 1.2 <= spread <= 3.5,
                       _diagnostic={"task-started spread (s)": spread})


@expect("rate_limit")
def _(o):
    assert o["rate_limited"], "4 tasks at 2/s start over ~1.5 s"
    for i, t in enumerate(o["tasks"]):
        assert_plain_success(t, i)


@case()
def case_track_started(run):
    r = run.send(TRACKED, (1.0,))
    states = run.poll_states(r.id)
    run.settle()
    return run.observe(states=states)


@expect("track_started")
def _(o):
    assert o["states"] == [{"status": "STARTED", "result": {"pid": "<pid>", "hostname": "<node>"}},
                           {"status": "SUCCESS", "result": "tracked"}], o["states"]
    [t] = o["tasks"]
    assert_plain_success(t, "tracked")


@case()
def case_typing_wrong_arguments(run):
    run.send(TYPED, (1,))
    run.send(TYPED, (1, 2, 3))
    run.send(TYPED, (1,), {"y": 2, "z": 3})
    run.settle()
    return run.observe()


@expect("typing_wrong_arguments")
def _(o):
    messages = ["typed() missing 1 required positional argument: 'y'",
                "typed() takes 2 positional arguments but 3 were given",
                "typed() got an unexpected keyword argument 'z'"]
    for t, message in zip(o["tasks"], messages):
        assert_failed(t, "TypeError", "builtins", [message])


@case()
def case_unencodable_result(run):
    run.send(UNENCODABLE)
    run.settle()
    return run.observe()


@expect("unencodable_result")
def _(o):
    [t] = o["tasks"]
    assert_failed(t, "EncodeError", "kombu.exceptions",
                  ["TypeError('Object of type Receipt is not JSON serializable')"])
    assert t["events"][2]["exception"] == "EncodeError(TypeError('Object of type Receipt is not JSON serializable'))"
    assert t["signals"][1]["exc"] == "Object of type Receipt is not JSON serializable"


@case()
def case_unserializable_exception_args(run):
    run.send(UNSERIALIZABLE_EXC)
    run.settle()
    return run.observe()


@expect("unserializable_exception_args")
def _(o):
    [t] = o["tasks"]
    assert_failed(t, "LedgerError", "proj.errors", ["Receipt(number=8)", "ledger closed"])
    assert t["events"][2]["exception"] == "LedgerError(Receipt(number=8), 'ledger closed')"


@case()
def case_process_exit(run):
    run.send(CRASH)
    run.settle()
    return run.observe()


@expect("process_exit")
def _(o):
    [t] = o["tasks"]
    assert_failed(t, "WorkerLostError", "billiard.exceptions", ["Worker exited prematurely: exitcode 3 Job: <n>."],
                  signals=[("task_prerun", "child"), ("task_failure", "main")])
    assert t["events"][2]["exception"] == "ExceptionWithTraceback()"
    assert t["doc"]["traceback"] is None


@case()
def case_group_redis(run):
    g = group(run.signature(ADD, i, i) for i in range(4)).apply_async()
    run.track(*[r.id for r in g.results])
    run.seed(g.id)
    value = g.get(timeout=20)
    run.settle()
    return run.observe(value=describe(value))


@expect("group_redis")
def _(o):
    assert o["value"] == [0, 2, 4, 6]
    for t, v in zip(o["tasks"], [0, 2, 4, 6]):
        assert_plain_success(t, v)
        assert t["doc"]["group_id"] == "<id4>", t["doc"]


@case()
def case_chord_redis(run):
    body = chord([run.signature(ADD, i, i) for i in range(3)])(run.signature(TSUM))
    header = [r.id for r in body.parent.results]
    run.track(*header, body.id)
    run.seed(body.parent.id)
    value = body.get(timeout=20)
    run.settle()
    return chord_body_parent(run.observe(value=describe(value)), body.id, header)


@expect("chord_redis")
def _(o):
    assert o["value"] == 6
    *header, body = o["tasks"]
    for t, v in zip(header, [0, 2, 4]):
        assert_plain_success(t, v)
    assert_plain_success(body, 6)
    assert body["events"][0]["args"] == "([0, 2, 4],)"


@case()
def case_chord_member_fails(run):
    body = chord([run.signature(ADD, 1, 1), run.signature(CHARGE, "4242", 5)])(run.signature(TSUM))
    header = [r.id for r in body.parent.results]
    run.track(*header, body.id)
    run.seed(body.parent.id)
    run.settle(header)
    run.wait_for(lambda: (run.side.doc(body.id) or {}).get("status") == "FAILURE", what="the chord body's FAILURE")
    run.settle(header)
    return run.observe()


@expect("chord_member_fails")
def _(o):
    ok, bad, body = o["tasks"]
    assert_plain_success(ok, 2)
    assert_failed(bad, "PaymentDeclined", "proj.errors", ["card 4242 declined for 5"])
    assert body["state"] == "FAILURE" and body["signals"] == [] and body["events"] == [], "the body never ran"
    assert body["doc"]["result"] == {
        "exc_type": "ChordError", "exc_module": "celery.exceptions",
        "exc_message": ["Dependency <id1> raised PaymentDeclined('card 4242 declined for 5')"]}, body["doc"]


@case()
def case_chain(run):
    last = (run.signature(ADD, 1, 2) | run.signature(ADD, 3) | run.signature(ADD, 4)).apply_async()
    run.track(last.parent.parent.id, last.parent.id, last.id)
    value = last.get(timeout=20)
    run.settle()
    return run.observe(value=describe(value))


@expect("chain")
def _(o):
    assert o["value"] == 10
    for t, v in zip(o["tasks"], [3, 6, 10]):
        assert_plain_success(t, v)
    assert [t["doc"]["children"] for t in o["tasks"]] == [[[["<id1>", None], None]], [[["<id2>", None], None]], []]
    assert [t["events"][0]["parent_id"] for t in o["tasks"]] == [None, "<id0>", "<id1>"]


REVOKED_SIGNAL = {"signal": "task_revoked", "task": None, "role": "main", "terminated": False, "signum": None,
                  "expired": False}


@case()
def case_revoke_before_start(run):
    r = run.send(ADD, (1, 2), countdown=1.5)
    run.wait_for(lambda: run.side.task_events(r.id), what="task-received")
    run.client.control.revoke(r.id, destination=[run.side.node])
    run.settle()
    return run.observe()


def assert_revoked(t, reason, signal, events):
    assert t["state"] == "REVOKED"
    assert t["doc"]["result"] == {"exc_type": "TaskRevokedError", "exc_message": [reason],
                                  "exc_module": "celery.exceptions"}, t["doc"]
    assert t["result"] == {"exception": "celery.exceptions.TaskRevokedError", "str": reason, "args": [reason]}
    revoked = [s for s in t["signals"] if s["signal"] == "task_revoked"]
    assert revoked == [signal], t["signals"]
    assert types(t) == events, types(t)


@expect("revoke_before_start")
def _(o):
    [t] = o["tasks"]
    assert_revoked(t, "revoked", dict(REVOKED_SIGNAL, task=ADD), ["task-received", "task-revoked"])
    assert t["events"][1] == {"type": "task-revoked", "uuid": "<id0>", "terminated": False, "signum": None,
                              "expired": False}
    assert sigs(t) == [("task_revoked", "main")]


@case()
def case_revoke_expired(run):
    run.send(ADD, (1, 2), countdown=1, expires=0.3)
    run.settle()
    return run.observe()


@expect("revoke_expired")
def _(o):
    [t] = o["tasks"]
    assert_revoked(t, "expired", dict(REVOKED_SIGNAL, task=ADD, expired=True), ["task-received", "task-revoked"])
    assert t["events"][1]["expired"] is True


@case()
def case_revoke_terminate(run):
    r = run.send(SLEEPY, (30,))
    run.wait_for(lambda: any(s["signal"] == "task_prerun" for s in run.side.signals(r.id)), what="task_prerun")
    time.sleep(0.3)
    run.client.control.revoke(r.id, destination=[run.side.node], terminate=True, signal="SIGTERM")
    run.settle()
    obs = run.observe()
    # NORMALIZED: the parent's task_revoked and the SIGTERM'd child's task_postrun race.
    rank = {"task_prerun": 0, "task_postrun": 1, "task_revoked": 2}
    obs["tasks"][0]["signals"].sort(key=lambda s: rank.get(s["signal"], 3))
    return obs


@expect("revoke_terminate")
def _(o):
    [t] = o["tasks"]
    assert_revoked(t, "terminated", dict(REVOKED_SIGNAL, task=SLEEPY, terminated=True, signum=15),
                   ["task-received", "task-started", "task-revoked"])
    # The child catches the SIGTERM: its tracer's finally runs task_postrun, with no state.
    assert sigs(t) == [("task_prerun", "child"), ("task_postrun", "child"), ("task_revoked", "main")], sigs(t)
    assert t["signals"][1]["state"] is None


@case(pair="aux")
def case_group_rpc(run):
    g = group(run.signature(ADD, i, 10) for i in range(3)).apply_async()
    run.track(*[r.id for r in g.results])
    run.seed(g.id)
    value = g.get(timeout=20)
    run.settle()
    return run.observe(value=describe(value))


@expect("group_rpc")
def _(o):
    assert o["value"] == [10, 11, 12]
    for t in o["tasks"]:
        assert t["doc"] is None and sigs(t) == RAN_OK and types(t) == OK_EVENTS


def otel_spans(run):
    """The spans of the traces that touch the run's tasks, normalized: ids as <idN>, trace and span ids
    as <traceN>/<spanN> in a stable order, only celery.* and messaging.* attributes."""
    norm = Normalizer(run.side, run.seeds)
    ids = set(run.ids)
    spans = run.side.spans()
    traces = {s["trace_id"] for s in spans if s["attributes"].get("messaging.message.id") in ids}
    mine = []
    for s in spans:
        if s["trace_id"] not in traces:
            continue
        attrs = {k: v for k, v in s["attributes"].items() if k.startswith(("celery.", "messaging."))}
        mine.append((norm(attrs), s))
    mine.sort(key=lambda p: (p[0].get("messaging.message.id", ""), p[1]["kind"] != "PRODUCER", p[1]["name"]))
    tokens = {}

    def token(kind, value):
        if value is None:
            return None
        return tokens.setdefault((kind, value), f"<{kind}{sum(1 for k in tokens if k[0] == kind)}>")
    out = []
    for attrs, s in mine:
        out.append({"name": s["name"], "kind": s["kind"], "trace": token("trace", s["trace_id"]),
                    "span": token("span", s["span_id"]), "parent": token("span", s["parent_span_id"]),
                    "status": s["status"], "status_description": s["status_description"], "attributes": attrs})
    return out


@case(pair="aux")
def case_otel_spans(run):
    ok = run.send(ADD, (2, 3))
    bad = run.send(CHARGE, ("4242", "5.00"))
    relay = run.send(RELAY, (4,))
    assert ok.get(timeout=20) == 5
    bad.get(timeout=20, propagate=False)
    run.track(relay.get(timeout=20))
    run.settle()
    return run.observe(spans=otel_spans(run))


@expect("otel_spans")
def _(o):
    spans = o["spans"]
    by_name = {}
    for s in spans:
        by_name.setdefault((s["name"], s["attributes"].get("messaging.message.id")), s)
    ok = by_name[(f"run/{ADD}", "<id0>")]
    assert ok["kind"] == "CONSUMER" and ok["status"] == "UNSET" and ok["parent"] is None
    assert ok["attributes"]["celery.state"] == "SUCCESS" and ok["attributes"]["celery.action"] == "run"
    assert ok["attributes"]["celery.task_name"] == ADD
    bad = by_name[(f"run/{CHARGE}", "<id1>")]
    assert bad["status"] == "ERROR" and bad["attributes"]["celery.state"] == "FAILURE", bad
    relay = by_name[(f"run/{RELAY}", "<id2>")]
    publish = by_name[(f"apply_async/{ADD}", "<id3>")]
    child = by_name[(f"run/{ADD}", "<id3>")]
    assert publish["kind"] == "PRODUCER" and publish["parent"] == relay["span"], "delay() inside the run span"
    assert child["parent"] == publish["span"] and child["trace"] == relay["trace"], "the child continues the trace"
    assert len({s["trace"] for s in spans}) == 3, spans
    assert len(spans) == 5, [s["name"] for s in spans]


# --- the tests ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CASES)
def test_celery_baseline(name, request):
    """Celery's observation has the expected values: proves the harness and the project."""
    obs = side_of(observed(request, name), "celery")
    assert "incomplete" not in obs.normalized, obs.normalized
    CASES[name].expect(copy.deepcopy(obs.normalized))


@pytest.mark.parametrize("name", CASES)
def test_same_outcome(name, request):
    """celeriac's observation equals Celery's, after normalization and the intentional differences."""
    both = observed(request, name)
    celery = copy.deepcopy(side_of(both, "celery").normalized)
    celeriac = copy.deepcopy(side_of(both, "celeriac").normalized)
    problems = reconcile(name, "celery", celery) + [f"celeriac: {p}" for p in reconcile(name, "celeriac", celeriac)]
    diffs = list(differences(celery, celeriac))
    diagnostics = {k: side_of(both, k).raw.get("_diagnostic") for k in ("celery", "celeriac")}
    assert not diffs, f"{len(diffs)} differences:\n" + describe_differences(diffs) + (
        f"\ndiagnostics: {diagnostics}" if any(diagnostics.values()) else "")
    assert not problems, problems


@pytest.mark.parametrize("difference", INTENTIONAL_DIFFERENCES)
def test_intentional_difference(difference, request):
    """Each intentional difference holds as described, on both sides, in every case it names."""
    diff = INTENTIONAL_DIFFERENCES[difference]
    problems = []
    for name in diff["cases"]:
        both = observed(request, name)
        for kind in ("celery", "celeriac"):
            obs = copy.deepcopy(side_of(both, kind).normalized)
            problems += [f"{name} on {kind}: {p}" for p in diff["apply"](name, kind, obs)]
    assert not problems, "\n".join(problems)


# --- -A of a module that does not load ------------------------------------------------------

BAD_APPS = {
    # module name -> (file content or None for "no such file", how the error may be named: the Python
    # error's class; for a missing top-level module Celery's own words "was not found" do as well)
    "no_such_module_pyapp": (None, ("ModuleNotFoundError", "was not found")),
    "broken_syntax_pyapp": ("def broken(:\n    pass\n", ("SyntaxError",)),
    "raises_at_import_pyapp": ('raise RuntimeError("cannot start: PROJ_DB_URL is not set")\n', ("RuntimeError",)),
    "missing_dependency_pyapp": ("import no_such_dependency_pyapp\n", ("ModuleNotFoundError",)),
}
DEAD_BROKER = "amqp://guest:guest@127.0.0.1:1//"  # nothing listens: a worker that tried to connect would hang


def run_bad_app(program, module, workdir):
    env = clean_env()
    env["CELERIAC_STATE_DIR"] = str(workdir / "state")
    env["CELERIAC_METRICS_BIND"] = "none"
    argv = [str(program), "-b", DEAD_BROKER, "-A", module, "--workdir", str(workdir), "worker", "--pool", "prefork",
            "-c", "1", "-Q", "pyapp-bad", "--without-mingle", "--without-gossip"]
    start = time.monotonic()
    p = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env, cwd=workdir)
    return p, time.monotonic() - start


@pytest.fixture
def bad_apps(tmp_path):
    for module, (content, _) in BAD_APPS.items():
        if content is not None:
            (tmp_path / f"{module}.py").write_text(content)
    return tmp_path


@pytest.mark.parametrize("module", BAD_APPS)
def test_celery_bad_app_baseline(module, bad_apps):
    """What `celery -A` does: exit 2, `Unable to load celery application.`, the module named, before connecting."""
    p, took = run_bad_app(PROGRAMS["celery"], module, bad_apps)
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert "Unable to load celery application." in p.stderr and module in p.stderr, p.stderr
    if BAD_APPS[module][0] is not None:  # a traceback ends with the error; a missing module is one sentence
        assert p.stderr.strip().splitlines()[-1].startswith(BAD_APPS[module][1][0]), p.stderr
    else:
        assert f"The module {module} was not found." in p.stderr, p.stderr


@pytest.mark.parametrize("module", BAD_APPS)
def test_celeriac_bad_app_one_line(module, bad_apps):
    """celeriac: exit non-zero, one line naming the module and the Python error, before connecting."""
    program = PROGRAMS["celeriac"]
    assert program.exists(), f"{program} is missing: tests/run.sh installs celeriac with `pip install .`"
    p, took = run_bad_app(program, module, bad_apps)
    assert p.returncode != 0, (p.stdout, p.stderr)
    lines = [line for line in (p.stdout + p.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert module in lines[0] and any(name in lines[0] for name in BAD_APPS[module][1]), lines[0]
    assert took < 30, "it gave up at the import, not after retrying the broker"


# --- worker lifecycle signals (stops the main pair: keep last) --------------------------------

WORKER_SIGNALS = {"worker_init", "worker_process_init", "worker_process_shutdown", "worker_ready", "worker_shutdown"}


def lifecycle(side):
    """Stops the worker with SIGTERM; returns what its worker-level signals and exit say."""
    before = [s for s in side.signals() if s["signal"] in WORKER_SIGNALS]
    code = side.stop()
    after = [s for s in side.signals() if s["signal"] in WORKER_SIGNALS][len(before):]
    started = sorted((s["signal"], s["role"]) for s in before if s["signal"] != "worker_process_shutdown")
    return {
        "exit_code": code,
        # Until the stop: one worker_init and worker_ready in the main process, a worker_process_init per
        # pool process started (2, plus one per process replaced after a crash, hard limit or terminate).
        # worker_process_shutdown of the replaced processes is left out: whether SIGTERM'd children run it
        # before billiard's SIGKILL is a race.
        "before_stop": started,
        "at_stop": sorted((s["signal"], s["role"], s.get("exitcode")) for s in after),
    }


def test_worker_lifecycle_signals(request):
    pair = request.getfixturevalue("main_pair")
    # Each worker replaces the processes the cases killed in its own time (Celery's pool had not
    # replaced the last one 4.5 s later once, in CI on CPython 3.13, 2026-12-07): wait, for up to
    # 20 s, until both have started as many processes. A real extra start on either side stays
    # unequal and is reported below.
    live = [s for s in pair.sides.values() if not s.error]
    started = lambda side: sum(1 for s in side.signals() if s["signal"] == "worker_process_init")  # noqa: E731
    deadline = time.monotonic() + 20
    while len({started(side) for side in live}) > 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    results = {}
    threads = [threading.Thread(target=lambda s=s: results.__setitem__(s.kind, lifecycle(s)))
               for s in pair.sides.values() if not s.error]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    celery = results["celery"]
    assert celery["exit_code"] == 0
    inits = [r for r in celery["before_stop"] if r[0] == "worker_process_init"]
    assert len(inits) >= 2 and set(inits) == {("worker_process_init", "child")}
    assert [r for r in celery["before_stop"] if r[0] != "worker_process_init"] == [
        ("worker_init", "main"), ("worker_ready", "main")]
    normal_stop = [("worker_process_shutdown", "child", 0)] * 2 + [("worker_shutdown", "main", None)]
    # Celery's side of the stop is itself a race: on a loaded machine one of its two pool processes
    # can be missing from worker_process_shutdown (seen once, in CI on CPython 3.13, 2026-12-07). The
    # oracle may lose a process's record; celeriac is held to the normal stop.
    assert celery["at_stop"] == normal_stop or (
        celery["at_stop"][-1] == normal_stop[-1] and set(celery["at_stop"][:-1]) <= {normal_stop[0]}
    ), celery["at_stop"]
    celery["at_stop"] = normal_stop
    pair.sides["celeriac"].require()
    celeriac = results["celeriac"]
    # Intentional difference (docs/python-apps.md): worker_ready and worker_shutdown run in
    # celeriac's control process, which never forks (a thread they start would stop the
    # supervisor's next fork), not in the process that received worker_init.
    for phase, signal_name in (("before_stop", "worker_ready"), ("at_stop", "worker_shutdown")):
        roles = [r[1] for r in celeriac[phase] if r[0] == signal_name]
        assert roles == ["other"], (signal_name, celeriac[phase])
        celeriac[phase] = [(r[0], "main", *r[2:]) if r[0] == signal_name else r for r in celeriac[phase]]
    assert celeriac == celery
