"""Harness for test_python_tasks.py: the example project examples/python-app
(`proj`) run by `celery -A proj worker` and by `celeriac -A proj worker` side
by side, and what a client, a Flower-like event receiver and the project's
own signal log see of each task.

A `Side` is one worker (celery or celeriac) with its own queue, node name,
signal log and Celery client app. A `Run` is one case on one side: the case
sends tasks through it, waits for them to settle and builds an observation
from the result backend, the signal log and the events. `normalize` then
replaces what must differ between two workers (ids, node and queue names,
pids, timestamps) so that two observations compare with `==`."""

import datetime
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import redis as redis_lib
from celery import Celery

from conftest import BROKER, REDIS_URL, ROOT, Worker

PROJECT = ROOT / "examples" / "python-app"
VENV_BIN = pathlib.Path(sys.executable).parent
CELERY_PROGRAM = VENV_BIN / "celery"
# The pip-installed console script (tests/run.sh runs `pip install .` into the venv):
# the plain Rust binary cannot host Python tasks.
CELERIAC_PROGRAM = pathlib.Path(os.environ.get("CELERIAC_PY_BIN") or VENV_BIN / "celeriac")
PROGRAMS = {"celery": CELERY_PROGRAM, "celeriac": CELERIAC_PROGRAM}

TERMINAL_EVENTS = {"task-succeeded", "task-failed", "task-rejected", "task-revoked"}
# Event fields that differ between any two workers, or two runs: dropped.
EVENT_NOISE = {"hostname", "timestamp", "utcoffset", "pid", "clock", "local_received", "runtime"}


def worker_argv(queue, node_prefix, app="proj", concurrency=2):
    """The command line both workers get, after the program name."""
    return ["-A", app, "--workdir", str(PROJECT), "worker", "--pool", "prefork", "-c", str(concurrency), "-E",
            "-Q", queue, "-n", f"{node_prefix}@%h", "--without-mingle", "--without-gossip", "-l", "INFO"]


def clean_env():
    """os.environ without the variables that would point a worker elsewhere."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("CELERY", "BROKER", "CELERIAC", "SSL_CERT_", "PROJ_", "RESULT_BACKEND"))}


def read_jsonl(path):
    try:
        text = pathlib.Path(path).read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line being written
            pass
    return out


class AppWorker(Worker):
    """`<program> -A proj ... worker ...` with its output in a log file (conftest's Worker, another argv)."""

    def __init__(self, program, argv, env, log_path, cwd):
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen([str(program), *argv], stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     cwd=cwd, start_new_session=True)


class EventCapture:
    """A Flower-like receiver: every event on the broker's celeryev exchange,
    kept per task id and per worker node."""

    def __init__(self):
        self.app = Celery("pyapp-events", broker=BROKER)
        self.lock = threading.Lock()
        self.by_task = {}
        self.nodes = {}  # hostname -> event types seen
        self.ready = threading.Event()
        self.error = None
        self.thread = threading.Thread(target=self._capture, daemon=True)
        self.thread.start()
        if not self.ready.wait(15):
            raise AssertionError(f"event receiver did not start: {self.error}")
        time.sleep(0.5)  # the receiver's queue is bound

    def _capture(self):
        def on_event(event):
            with self.lock:
                self.nodes.setdefault(event.get("hostname"), []).append(event.get("type"))
                if event.get("uuid"):
                    self.by_task.setdefault(event["uuid"], []).append(dict(event))
        try:
            with self.app.connection_for_read() as conn:
                recv = self.app.events.Receiver(conn, handlers={"*": on_event},
                                                queue_prefix=f"pyapp-events-{uuid.uuid4().hex[:6]}")
                self.ready.set()
                recv.capture(limit=None, timeout=None, wakeup=False)
        except Exception as e:  # noqa: BLE001 - reported by whoever waits for events
            self.error = repr(e)
            self.ready.set()

    def task(self, task_id, node):
        with self.lock:
            return [dict(e) for e in self.by_task.get(task_id, []) if e.get("hostname") == node]

    def node_named(self, prefix):
        with self.lock:
            return next((h for h in self.nodes if h and h.startswith(prefix + "@")), None)


class Side:
    """One worker under test: celery (the judge) or celeriac."""

    def __init__(self, kind, tmp, events, backend, otel=False):
        self.kind = kind
        self.events = events
        self.backend = backend
        self.queue = f"pyapp-{uuid.uuid4().hex[:10]}"
        self.prefix = f"{kind}-{self.queue}"
        self.node = None
        self.tmp = pathlib.Path(tmp)
        self.signal_log = self.tmp / f"{kind}-signals.jsonl"
        self.spans_log = self.tmp / f"{kind}-spans.jsonl" if otel else None
        self.log_path = self.tmp / f"{kind}-worker.log"
        self.worker = None
        self.error = None
        self.client = Celery(f"pyapp-client-{kind}", broker=BROKER, backend=backend)
        self.client.conf.update(task_default_queue=self.queue, accept_content=["json"],
                                broker_connection_retry_on_startup=True)
        self.redis = redis_lib.Redis.from_url(REDIS_URL) if backend.startswith("redis") else None

    # --- lifecycle ---

    def env(self):
        env = clean_env()
        env.update({
            "CELERY_BROKER_URL": BROKER,
            "CELERY_RESULT_BACKEND": self.backend,
            "PROJ_TASK_QUEUE": self.queue,
            "PROJ_SIGNAL_LOG": str(self.signal_log),
            # celeriac's own, as variables so both workers get the same command line.
            "CELERIAC_STATE_DIR": str(self.tmp / f"{self.kind}-state"),
            "CELERIAC_METRICS_BIND": "none",
        })
        if self.spans_log:
            env["PROJ_OTEL_SPANS"] = str(self.spans_log)
        return env

    def start(self):
        program = PROGRAMS[self.kind]
        if not program.exists():
            self.error = f"{program} is missing (tests/run.sh installs celeriac into the venv with `pip install .`)"
            return
        self.worker = AppWorker(program, worker_argv(self.queue, self.prefix), self.env(), self.log_path, self.tmp)

    def wait_ready(self, timeout=90):
        """Ready = the project's worker_ready receiver ran and the node's events arrive."""
        if self.error:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.worker.alive():
                self.error = f"{self.kind} worker exited with {self.worker.proc.returncode} before ready:\n" \
                             f"{self.worker.log()[-3000:]}"
                return
            ready = any(s["signal"] == "worker_ready" for s in read_jsonl(self.signal_log))
            self.node = self.node or self.events.node_named(self.prefix)
            if ready and self.node:
                return
            time.sleep(0.1)
        self.error = f"{self.kind} worker not ready within {timeout}s (worker_ready signal, events from " \
                     f"{self.prefix}@...):\n{self.worker.log()[-3000:]}"

    def require(self):
        if self.error:
            raise AssertionError(self.error)

    def stop(self):
        if self.worker is not None and self.worker.alive():
            return self.worker.stop(signal.SIGTERM, timeout=60)
        return None if self.worker is None else self.worker.proc.returncode

    def close(self):
        if self.worker is not None:
            if self.worker.alive():
                self.worker.stop(signal.SIGKILL)
            else:
                self.worker.stop()
        self.client.close()
        if self.redis is not None:
            self.redis.close()

    # --- what a case reads ---

    def signals(self, task_id=None):
        lines = read_jsonl(self.signal_log)
        return lines if task_id is None else [s for s in lines if s.get("task_id") == task_id]

    def task_events(self, task_id):
        return self.events.task(task_id, self.node)

    def doc(self, task_id):
        if self.redis is None:
            return None
        raw = self.redis.get(f"celery-task-meta-{task_id}")
        return None if raw is None else json.loads(raw)

    def spans(self):
        return read_jsonl(self.spans_log) if self.spans_log else []

    def run(self, case):
        self.require()
        return Run(self, case)


def canonical_events(events):
    """Events of one task in attempt order: received(n), then what the attempt
    sent up to its task-retried. Celery's prefork pool sends the retried
    message's task-received before the previous attempt's task-retried more
    often than not (the child publishes the retry, the parent reads the
    child's result later): that order is a race, not a behaviour."""
    received = sorted((e for e in events if e.get("type") == "task-received"), key=lambda e: e.get("retries") or 0)
    attempts, current = [], []
    for e in events:
        if e.get("type") == "task-received":
            continue
        current.append(e)
        if e.get("type") == "task-retried":
            attempts.append(current)
            current = []
    if current or not attempts:
        attempts.append(current)
    out = []
    for i in range(max(len(received), len(attempts))):
        if i < len(received):
            out.append(received[i])
        if i < len(attempts):
            out.extend(attempts[i])
    return out


def default_final(events, signals):
    return any(e.get("type") in TERMINAL_EVENTS for e in events)


def postrun_seen(events, signals):
    return any(s["signal"] == "task_postrun" for s in signals)


class Run:
    """One case on one side: the ids it tracks and how to observe them."""

    def __init__(self, side, case):
        self.side = side
        self.case = case
        self.ids = []
        self.seeds = []  # ids in the order they get canonical names
        self.incomplete = []

    @property
    def client(self):
        return self.side.client

    def seed(self, *ids):
        for i in ids:
            if i and i not in self.seeds:
                self.seeds.append(i)

    def track(self, *ids):
        for i in ids:
            if i not in self.ids:
                self.ids.append(i)
        self.seed(*ids)

    def send(self, name, args=(), kwargs=None, **options):
        result = self.client.send_task(name, args, kwargs, **options)
        self.track(result.id)
        return result

    def signature(self, name, *args, **kwargs):
        return self.client.signature(name, args=args, kwargs=kwargs)

    def wait_for(self, predicate, timeout=20, what="condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            if self.side.worker is not None and not self.side.worker.alive():
                raise AssertionError(f"{self.side.kind} worker died while waiting for {what}:\n"
                                     f"{self.side.worker.log()[-3000:]}")
            time.sleep(0.05)
        raise AssertionError(f"{self.side.kind}: timed out waiting for {what}")

    def snapshot(self, ids):
        return [(len(self.side.task_events(i)), len(self.side.signals(i)),
                 (self.side.doc(i) or {}).get("status")) for i in ids]

    def settle(self, ids=None, until=default_final, timeout=25, quiet=0.8):
        """Waits until `until(events, signals)` holds for every id, then until
        nothing about them changes for `quiet` seconds. Ids that never get
        there are listed in the observation as incomplete."""
        ids = list(ids or self.ids)
        deadline = time.monotonic() + timeout
        pending = list(ids)
        while pending and time.monotonic() < deadline:
            pending = [i for i in pending if not until(self.side.task_events(i), self.side.signals(i))]
            if pending:
                time.sleep(0.05)
        self.incomplete.extend(i for i in pending if i not in self.incomplete)
        last, since = self.snapshot(ids), time.monotonic()
        while time.monotonic() - since < quiet:
            time.sleep(0.1)
            now = self.snapshot(ids)
            if now != last:
                last, since = now, time.monotonic()

    def result_of(self, task_id):
        """(state, value) as the client's AsyncResult reports them (redis backend only)."""
        if self.side.redis is None:
            return None, None
        r = self.client.AsyncResult(task_id)
        return r.state, describe(r.result)

    def task_view(self, task_id):
        state, value = self.result_of(task_id)
        signals = self.side.signals(task_id)
        return {
            "id": task_id,
            "state": state,
            "result": value,
            "doc": self.side.doc(task_id),
            "retries_signalled": sum(1 for s in signals if s["signal"] == "task_retry"),
            "signals": [{k: v for k, v in s.items() if k not in ("pid", "task_id", "time")} for s in signals],
            "events": [{k: v for k, v in e.items() if k not in EVENT_NOISE}
                       for e in canonical_events(self.side.task_events(task_id))],
        }

    def observe(self, **extra):
        """The observation of every tracked id, plus what the case adds."""
        obs = dict(extra)
        obs["tasks"] = [self.task_view(i) for i in self.ids]
        if self.incomplete:
            obs["incomplete"] = list(self.incomplete)
        return obs

    def poll_states(self, task_id, seconds=15):
        """The distinct (status, result) documents the backend holds while the task runs, until it is ready."""
        seen = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            doc = self.side.doc(task_id)
            if doc is not None:
                entry = {"status": doc["status"], "result": doc["result"]}
                if not seen or seen[-1] != entry:
                    seen.append(entry)
                if doc["status"] in ("SUCCESS", "FAILURE", "REVOKED"):
                    break
            time.sleep(0.03)
        return seen


# --- describing Python values the client got back ---

def describe(value):
    """A JSON-able description that keeps Python types apart (tuple vs list, datetime, Decimal...)."""
    if isinstance(value, BaseException):
        return {"exception": f"{type(value).__module__}.{type(value).__qualname__}", "str": str(value),
                "args": describe(list(value.args))}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [describe(v) for v in value]
    if isinstance(value, tuple):
        return {"py": "tuple", "items": [describe(v) for v in value]}
    if isinstance(value, dict):
        return {str(k) if isinstance(k, str) else repr(k): describe(v) for k, v in value.items()}
    return {"py": f"{type(value).__module__}.{type(value).__qualname__}", "repr": repr(value)}


# --- normalization ---

UUID_RE = re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b")
# Literals the project and the tests use as values, not ids.
LITERAL_UUIDS = {"12345678-1234-5678-1234-567812345678", "87654321-4321-8765-4321-876543218765"}
TIME_KEYS = {"date_done", "eta", "expires"}
PID_KEYS = {"pid"}
ORIGIN_RE = re.compile(r"\bgen\d+@")
JOB_RE = re.compile(r"Job: \d+\.")
ISO_RE = re.compile(r"\b\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:[+-]\d{2}:\d{2}|Z)?")
RECENT = datetime.timedelta(days=2)


def _recent_time_token(match):
    """A date-time of about now inside a text (an eta in a result's repr) becomes its shape; the
    literals the project uses as values are far from now and stay."""
    text = match.group(0)
    try:
        parsed = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return text
    now = datetime.datetime.now(datetime.timezone.utc)
    aware = parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.timezone.utc)
    if abs(aware - now) > RECENT:
        return text
    return "<datetime+tz>" if parsed.tzinfo is not None else "<datetime>"


def _time_token(value):
    if not isinstance(value, str):
        return value
    try:
        parsed = datetime.datetime.fromisoformat(value)
    except ValueError:
        return value
    return "<datetime+tz>" if parsed.tzinfo is not None else "<datetime>"


class Normalizer:
    """Replaces ids by <id0>, <id1>... (seeded ids first, then in traversal order
    with dict keys sorted), this side's node and queue names by <node> and
    <queue>, `gen<pid>@` origins, billiard's job numbers, pids, and the
    date-times of date_done/eta/expires by their shape."""

    def __init__(self, side, seeds=()):
        self.ids = {}
        self.node_re = re.compile(re.escape(side.prefix) + r"@[\w.-]+")
        self.queue = side.queue
        for s in seeds:
            self._id(s)

    def _id(self, u):
        if u in LITERAL_UUIDS:
            return u
        if u not in self.ids:
            self.ids[u] = f"<id{len(self.ids)}>"
        return self.ids[u]

    def text(self, s):
        s = self.node_re.sub("<node>", s)
        s = s.replace(self.queue, "<queue>")
        s = ORIGIN_RE.sub("gen<pid>@", s)
        s = JOB_RE.sub("Job: <n>.", s)
        s = ISO_RE.sub(_recent_time_token, s)
        return UUID_RE.sub(lambda m: self._id(m.group(0)), s)

    def __call__(self, value, key=None):
        if key in TIME_KEYS and isinstance(value, str):
            return _time_token(value)
        if key in PID_KEYS and isinstance(value, int) and not isinstance(value, bool):
            return "<pid>"
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, list):
            return [self(v) for v in value]
        if isinstance(value, dict):
            # "_diagnostic" is shown when a comparison fails, never compared
            return {self.text(k): self(value[k], k) for k in sorted(value, key=str) if k != "_diagnostic"}
        return value


def normalize(obs, run):
    return Normalizer(run.side, run.seeds)(obs)


def differences(expected, actual, path="$"):
    """(path, expected, actual) for every place two observations differ; types count (1, 1.0 and True
    differ). Lists of different lengths are reported whole."""
    if type(expected) is not type(actual):
        yield path, expected, actual
    elif isinstance(expected, dict):
        for k in sorted(set(expected) | set(actual), key=str):
            if k not in actual:
                yield f"{path}.{k}", expected[k], "<absent>"
            elif k not in expected:
                yield f"{path}.{k}", "<absent>", actual[k]
            else:
                yield from differences(expected[k], actual[k], f"{path}.{k}")
    elif isinstance(expected, list):
        if len(expected) != len(actual):
            yield f"{path} (lengths {len(expected)}, {len(actual)})", expected, actual
        else:
            for i, (e, a) in enumerate(zip(expected, actual)):
                yield from differences(e, a, f"{path}[{i}]")
    elif expected != actual:
        yield path, expected, actual


def describe_differences(diffs, left="celery", right="celeriac", limit=1500):
    def short(v):
        r = repr(v)
        return r if len(r) <= limit else r[:limit] + "..."

    def one(path, e, a):
        if isinstance(e, str) and isinstance(a, str) and len(e) + len(a) > 400:
            at = next((i for i, (x, y) in enumerate(zip(e, a)) if x != y), min(len(e), len(a)))
            start = max(0, at - 120)
            return (f"{path} (texts differ from character {at}):\n    {left}:   ...{e[start:at + 200]!r}\n"
                    f"    {right}: ...{a[start:at + 200]!r}")
        return f"{path}:\n    {left}:   {short(e)}\n    {right}: {short(a)}"
    return "\n".join(one(*d) for d in diffs)


def hostname():
    return socket.gethostname()
