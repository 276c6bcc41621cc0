"""Differential tests for a Django + PostgreSQL project: examples/django-app
(`shop`, a Django project whose Celery app is set up with
`config_from_object("django.conf:settings", namespace="CELERY")` and
`autodiscover_tasks()`) run by `celery -A shop worker` (the judge) and by
`celeriac -A shop worker`, with the same command line, each with a queue, a
node name and a database of its own, in a PostgreSQL cluster of the tests' own
(private_postgres.py).

Two settings variants, each a pair of workers (-c 2):
  persistent  CONN_MAX_AGE = 600
  pool        Django's psycopg connection pool (OPTIONS pool=True)
Both run the project's worker_init receiver, which queries the database in the
worker's main process before the pool forks and leaves that connection open.

Every case runs on both workers at once and yields an observation: per task,
the state and value the client's AsyncResult reports (with the stored
exception's type, module and message), and the database rows the case touched.
`test_celery_baseline` asserts the expected values on Celery's observation
alone; `test_same_outcome` asserts celeriac's equals Celery's after
normalizing ids, node and queue names.

Run: .venv/bin/python -m pytest -q tests/interop/test_django_tasks.py"""

import copy
import json
import re
import signal
import subprocess
import time
import urllib.parse
import uuid
from concurrent.futures import ThreadPoolExecutor

import amqp
import psycopg
import pytest
import redis as redis_lib
from celery import Celery

from conftest import BROKER, REDIS_URL, ROOT, amqp_channel
from private_postgres import postgres  # noqa: F401 - the session fixture
from pyapp_harness import (
    PROGRAMS, VENV_BIN, AppWorker, Normalizer, clean_env, describe, describe_differences, differences, read_jsonl,
)

PROJECT = ROOT / "examples" / "django-app"
# Results in a Redis database of their own, so the stored documents can be read and compared.
RESULTS_URL = urllib.parse.urlsplit(REDIS_URL)._replace(path="/5").geturl()
CONCURRENCY = 2
VARIANTS = {
    "persistent": {"SHOP_DB_POOL": "0"},
    "pool": {"SHOP_DB_POOL": "1"},
}
READY_STATES = ("SUCCESS", "FAILURE", "REVOKED")
TEMPLATE_DB = "shop_template"

ADD_PRODUCT = "inventory.tasks.add_product"
STOCK_OF = "inventory.tasks.stock_of"
COUNT_PRODUCTS = "inventory.tasks.count_products"
RESERVE = "inventory.tasks.reserve"
LOCK_OUTSIDE_TRANSACTION = "inventory.tasks.lock_outside_transaction"
CONNECTION_STATE = "inventory.tasks.connection_state"
HOLD_CONNECTION = "inventory.tasks.hold_connection"

# What a worker's log must not hold once it is ready: a receiver that raised (Celery's signal dispatch logs
# "Signal handler <receiver> raised: <exception>" with its traceback), or the fixup's AttributeError.
STARTUP_LOG_PROBLEMS = ("Traceback (most recent call last)", "AttributeError", "Signal handler")


# --- the database -----------------------------------------------------------------------------

@pytest.fixture(scope="session")
def shop_template(postgres):  # noqa: F811 - the imported fixture
    """A database migrated once with the project's migrations; each worker gets a copy."""
    postgres.sql(f'CREATE DATABASE "{TEMPLATE_DB}"')
    env = project_env({"SHOP_DATABASE_URL": postgres.dsn(TEMPLATE_DB)})
    p = subprocess.run([str(VENV_BIN / "python"), "manage.py", "migrate", "--no-input", "-v", "1"], cwd=PROJECT,
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f"manage.py migrate failed:\n{p.stdout}\n{p.stderr}"
    return TEMPLATE_DB


def project_env(extra):
    env = clean_env()
    env = {k: v for k, v in env.items() if not k.startswith(("SHOP_", "DJANGO_"))}
    env["DJANGO_SETTINGS_MODULE"] = "shop.settings"
    env.update(extra)
    return env


# --- one worker ------------------------------------------------------------------------------

class DjangoSide:
    """One worker under test (celery or celeriac) for one settings variant: its queue, node name, database,
    application_name (to find its connections in pg_stat_activity), signal log and client."""

    def __init__(self, kind, variant, tmp, postgres):  # noqa: F811
        self.kind = kind
        self.variant = variant
        self.postgres = postgres
        self.queue = f"django-{variant}-{uuid.uuid4().hex[:8]}"
        # Node names of equal length on both sides (see pyapp_harness.Side).
        self.prefix = f"{ {'celery': 'py', 'celeriac': 'rs'}[kind]}-{self.queue}"
        self.db = f"shop_{variant}_{kind}"
        self.app_name = f"{kind}-{self.queue}"
        self.tmp = tmp
        self.signal_log = tmp / f"{kind}-signals.jsonl"
        self.log_path = tmp / f"{kind}-worker.log"
        self.startup_log = None
        self.worker = None
        self.error = None
        postgres.sql(f'CREATE DATABASE "{self.db}" TEMPLATE "{TEMPLATE_DB}"')
        self.client = Celery(f"django-client-{kind}", broker=BROKER, backend=RESULTS_URL)
        self.client.conf.update(task_default_queue=self.queue, accept_content=["json"],
                                broker_connection_retry_on_startup=True)
        self.redis = redis_lib.Redis.from_url(RESULTS_URL)
        self.sent = []  # task ids whose results are deleted at close

    def env(self):
        return project_env({
            "CELERY_BROKER_URL": BROKER,
            "CELERY_RESULT_BACKEND": RESULTS_URL,
            "SHOP_TASK_QUEUE": self.queue,
            "SHOP_SIGNAL_LOG": str(self.signal_log),
            "SHOP_DATABASE_URL": self.postgres.dsn(self.db),
            "SHOP_DB_APP_NAME": self.app_name,
            **VARIANTS[self.variant],
            "CELERIAC_STATE_DIR": str(self.tmp / f"{self.kind}-state"),
            "CELERIAC_METRICS_BIND": "none",
        })

    def argv(self):
        return ["-A", "shop", "--workdir", str(PROJECT), "worker", "--pool", "prefork", "-c", str(CONCURRENCY),
                "-Q", self.queue, "-n", f"{self.prefix}@%h", "--without-mingle", "--without-gossip", "-l", "INFO"]

    def start(self):
        program = PROGRAMS[self.kind]
        if not program.exists():
            self.error = f"{program} is missing (tests/run.sh installs celeriac into the venv with `pip install .`)"
            return
        self.worker = AppWorker(program, self.argv(), self.env(), self.log_path, self.tmp)

    def wait_ready(self, timeout=90):
        """Ready = the project's worker_ready receiver ran and every pool process ran worker_process_init."""
        if self.error:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.worker.alive():
                self.error = (f"{self.kind} worker exited with {self.worker.proc.returncode} before ready:\n"
                              f"{self.worker.log()[-3000:]}")
                self.startup_log = self.worker.log()
                return
            lines = [s["signal"] for s in read_jsonl(self.signal_log)]
            if "worker_ready" in lines and lines.count("worker_process_init") >= CONCURRENCY:
                time.sleep(0.5)  # what the worker logs right after
                self.startup_log = self.worker.log()
                return
            time.sleep(0.1)
        self.startup_log = self.worker.log()
        self.error = f"{self.kind} worker not ready within {timeout}s:\n{self.startup_log[-3000:]}"

    def require(self):
        if self.error:
            raise AssertionError(self.error)

    def close(self):
        if self.worker is not None:
            if self.worker.alive():
                self.worker.stop(signal.SIGTERM, timeout=30)
            else:
                self.worker.stop()
        self.client.close()
        ids = list(self.sent)
        for parent in self.sent:
            ids += Run(self).children(parent)
        if ids:
            self.redis.delete(*(f"celery-task-meta-{i}" for i in ids))
        self.redis.close()

    # --- what a case reads ---

    def doc(self, task_id):
        raw = self.redis.get(f"celery-task-meta-{task_id}")
        return None if raw is None else json.loads(raw)

    def rows(self, prefix):
        """The products and orders whose SKU starts with `prefix`, as sorted tuples (no ids: sequences differ)."""
        with psycopg.connect(self.postgres.dsn(self.db), autocommit=True) as conn:
            products = conn.execute("SELECT sku, name, stock FROM inventory_product WHERE sku LIKE %s ORDER BY sku",
                                    [prefix + "%"]).fetchall()
            orders = conn.execute(
                "SELECT p.sku, o.quantity, o.status FROM inventory_order o JOIN inventory_product p "
                "ON p.id = o.product_id WHERE p.sku LIKE %s ORDER BY 1, 2, 3", [prefix + "%"]).fetchall()
        return {"products": [list(r) for r in products], "orders": [list(r) for r in orders]}

    def backends(self, where="TRUE"):
        """pids of this worker's database connections (its application_name), but the caller's own."""
        return [r[0] for r in self.postgres.sql(
            f"SELECT pid FROM pg_stat_activity WHERE application_name = %s AND pid <> pg_backend_pid() AND {where}",
            [self.app_name])]


class Run:
    """One case on one side."""

    def __init__(self, side):
        self.side = side
        self.ids = []

    def send(self, name, *args, **options):
        r = self.side.client.send_task(name, args, **options)
        self.ids.append(r.id)
        self.side.sent.append(r.id)
        return r.id

    def wait(self, ids, timeout=30):
        """Waits until every id has a ready document; returns the ids that never got one."""
        deadline = time.monotonic() + timeout
        pending = list(ids)
        while pending and time.monotonic() < deadline:
            pending = [i for i in pending if (self.side.doc(i) or {}).get("status") not in READY_STATES]
            if pending:
                if self.side.worker is not None and not self.side.worker.alive():
                    break
                time.sleep(0.05)
        return pending

    def children(self, task_id):
        """Ids of the tasks `task_id` sent (its document's children)."""
        doc = self.side.doc(task_id) or {}
        found = re.findall(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
                           json.dumps(doc.get("children") or []))
        return list(dict.fromkeys(found))

    def outcome(self, task_id):
        """What the client sees of one task: state, value (or exception), and the stored exception."""
        doc = self.side.doc(task_id)
        if doc is None:
            return {"id": task_id, "state": "no result"}
        r = self.side.client.AsyncResult(task_id)
        out = {"id": task_id, "state": r.state, "result": describe(r.result)}
        if doc["status"] == "FAILURE":
            out["stored"] = doc["result"]  # exc_type, exc_module, exc_message
        children = self.children(task_id)
        if children:
            out["children"] = [self.outcome(c) for c in children]
        return out

    def observe(self, prefix, **extra):
        pending = self.wait(self.ids)
        for i in self.ids:  # tasks sent by tasks (on_commit): wait for those too
            pending += self.wait(self.children(i))
        obs = dict(extra)
        obs["tasks"] = [self.outcome(i) for i in self.ids]
        obs["db"] = self.side.rows(prefix)
        if pending:
            obs["incomplete"] = pending
        return obs


# --- the two workers ------------------------------------------------------------------------

class Pair:
    """celery and celeriac for one settings variant, started together."""

    def __init__(self, variant, tmp, postgres):  # noqa: F811
        self.variant = variant
        self.sides = {kind: DjangoSide(kind, variant, tmp, postgres) for kind in PROGRAMS}
        self.executors = {kind: ThreadPoolExecutor(1, thread_name_prefix=f"django-{kind}") for kind in PROGRAMS}
        for side in self.sides.values():
            side.start()
        for side in self.sides.values():
            side.wait_ready()
        self.sides["celery"].require()  # the judge must run; celeriac's failure is reported per test
        self.observed = {}

    def observe(self, name):
        """Runs the case on both sides at once (each side's client in one thread of its own)."""
        if name in self.observed:
            return self.observed[name]

        def one(side):
            try:
                side.require()
                run = Run(side)
                raw = CASES[name].fn(run)
                return {"raw": raw, "normalized": Normalizer(side, run.ids)(raw)}
            except BaseException as e:  # noqa: BLE001 - handed to the test that needs it
                return e
        futures = {kind: self.executors[kind].submit(one, side) for kind, side in self.sides.items()}
        self.observed[name] = {kind: f.result() for kind, f in futures.items()}
        return self.observed[name]

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


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, postgres, shop_template, tmp_path_factory):  # noqa: F811
    p = Pair(request.param, tmp_path_factory.mktemp(f"django-{request.param}"), postgres)
    yield p
    p.close()


def side_of(obs, kind):
    value = obs[kind]
    if isinstance(value, BaseException):
        raise AssertionError(f"{kind} side failed: {value}") from value
    return value


# --- cases ----------------------------------------------------------------------------------

class Case:
    def __init__(self, name, fn):
        self.name, self.fn, self.expect = name, fn, None


CASES = {}


def case(fn):
    name = fn.__name__.removeprefix("case_")
    CASES[name] = Case(name, fn)
    return fn


def expect(name):
    def deco(fn):
        CASES[name].expect = fn
        return fn
    return deco


def ok(value):
    return {"state": "SUCCESS", "result": value}


def failed(exc_type, exc_module, message):
    """A failure as `brief` shows it: the stored document's exception, and the class name and message of the
    exception the client raises (a class the client cannot import is made up in celery.exceptions)."""
    return {"state": "FAILURE", "exception": exc_type.rsplit(".", 1)[-1], "str": message,
            "stored": {"exc_type": exc_type, "exc_module": exc_module, "exc_message": [message]}}


def strip_ids(task):
    out = {k: v for k, v in task.items() if k != "id"}
    if "children" in out:
        out["children"] = [strip_ids(c) for c in out["children"]]
    return out


def brief(task):
    """A task outcome without ids, a failure as `failed` describes it; its children likewise."""
    out = {"state": task["state"]}
    if task["state"] == "FAILURE":
        exc = task["result"]
        out.update(exception=exc["exception"].rsplit(".", 1)[-1], str=exc["str"], stored=task["stored"])
    else:
        out["result"] = task.get("result")
    if "children" in task:
        out["children"] = [brief(c) for c in task["children"]]
    return out


@case
def case_orm_write_read(run):
    run.wait([run.send(ADD_PRODUCT, "rw-widget", "Widget", 7)])
    run.send(STOCK_OF, "rw-widget")
    run.send(COUNT_PRODUCTS, "rw-")
    return run.observe("rw-")


@expect("orm_write_read")
def _(o):
    assert [brief(t) for t in o["tasks"]] == [
        ok({"sku": "rw-widget", "name": "Widget", "stock": 7}), ok(7), ok(1)], o["tasks"]
    assert o["db"] == {"products": [["rw-widget", "Widget", 7]], "orders": []}


@case
def case_orm_errors(run):
    run.wait([run.send(ADD_PRODUCT, "err-bolt", "Bolt", 1)])
    run.send(ADD_PRODUCT, "err-bolt", "Bolt again", 2)
    run.send(STOCK_OF, "err-missing")
    run.send(LOCK_OUTSIDE_TRANSACTION, "err-bolt")
    return run.observe("err-")


@expect("orm_errors")
def _(o):
    created, duplicate, missing, lock = [brief(t) for t in o["tasks"]]
    assert created == ok({"sku": "err-bolt", "name": "Bolt", "stock": 1})
    assert duplicate == failed("IntegrityError", "django.db.utils",
                               'duplicate key value violates unique constraint "inventory_product_sku_key"\n'
                               "DETAIL:  Key (sku)=(err-bolt) already exists."), duplicate
    assert missing == failed("Product.DoesNotExist", "inventory.models", "Product matching query does not exist."), missing
    assert lock == failed("TransactionManagementError", "django.db.transaction",
                          "select_for_update cannot be used outside of a transaction."), lock
    assert o["db"] == {"products": [["err-bolt", "Bolt", 1]], "orders": []}


@case
def case_fresh_connection(run):
    for _ in range(6):
        run.send(CONNECTION_STATE)
    return run.observe("fresh-")


@expect("fresh_connection")
def _(o):
    # Celery's Django fixup closes the connection before each task, and a pool process never uses the one
    # the main process opened in worker_init.
    assert [brief(t) for t in o["tasks"]] == [ok({"open_at_start": False, "main_backend": False})] * 6


@case
def case_on_commit(run):
    run.wait([run.send(ADD_PRODUCT, "oc-lamp", "Lamp", 3)])
    run.wait([run.send(RESERVE, "oc-lamp", 2)])
    run.send(RESERVE, "oc-lamp", 5)  # more than the stock: rolled back, nothing sent
    return run.observe("oc-")


@expect("on_commit")
def _(o):
    created, reserved, refused = [brief(t) for t in o["tasks"]]
    assert created == ok({"sku": "oc-lamp", "name": "Lamp", "stock": 3})
    assert reserved == dict(ok({"sku": "oc-lamp", "quantity": 2, "stock_left": 1}), children=[
        ok({"sku": "oc-lamp", "quantity": 2, "status": "confirmed", "updated": 1})]), reserved
    assert refused == failed("OutOfStock", "inventory.models", "oc-lamp: 5 wanted, 1 in stock"), refused
    assert o["db"] == {"products": [["oc-lamp", "Lamp", 1]], "orders": [["oc-lamp", 2, "confirmed"]]}


@case
def case_select_for_update(run):
    run.wait([run.send(ADD_PRODUCT, "sfu-chair", "Chair", 3)])
    # Five reservations of one on a stock of three, two at a time (-c 2), each holding the row lock a while:
    # without the lock, two would read the same stock and one update would be lost.
    for _ in range(5):
        run.send(RESERVE, "sfu-chair", 1, 0.2)
    obs = run.observe("sfu-")
    # Which reservation got which stock depends on the order the processes took the lock: compared sorted,
    # without their ids.
    obs["tasks"] = sorted((strip_ids(t) for t in obs["tasks"]), key=lambda t: json.dumps(t, sort_keys=True))
    return obs


@expect("select_for_update")
def _(o):
    outcomes = sorted((brief(t) for t in o["tasks"]), key=lambda t: json.dumps(t, sort_keys=True))
    refused = failed("OutOfStock", "inventory.models", "sfu-chair: 1 wanted, 0 in stock")
    confirmed = ok({"sku": "sfu-chair", "quantity": 1, "status": "confirmed", "updated": 1})
    assert outcomes == sorted([refused, refused, ok({"sku": "sfu-chair", "name": "Chair", "stock": 3})] + [
        dict(ok({"sku": "sfu-chair", "quantity": 1, "stock_left": left}), children=[confirmed])
        for left in (2, 1, 0)], key=lambda t: json.dumps(t, sort_keys=True)), outcomes
    assert o["db"] == {"products": [["sfu-chair", "Chair", 0]], "orders": [["sfu-chair", 1, "confirmed"]] * 3}


@case
def case_killed_connection(run):
    """pg_terminate_backend on every connection of the worker while a task holds one; then more tasks."""
    side = run.side
    run.wait([run.send(ADD_PRODUCT, "kill-gear", "Gear", 4)])
    held = run.send(HOLD_CONNECTION, 5)
    deadline = time.monotonic() + 15
    running = []
    while not running and time.monotonic() < deadline:
        running = side.backends("state = 'active' AND query LIKE '%%pg_sleep%%'")
        if not running and (side.doc(held) or {}).get("status") in READY_STATES:
            break
        time.sleep(0.05)
    terminated = side.postgres.sql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s "
        "AND pid <> pg_backend_pid()", [side.app_name])
    run.wait([held])
    after = [run.send(STOCK_OF, "kill-gear") for _ in range(6)]
    run.wait(after)  # the reads, then the write: in this order on both workers
    after.append(run.send(RESERVE, "kill-gear", 1))
    return run.observe("kill-", held_while_killed=bool(running),
                       _diagnostic={"terminated": len(terminated), "after": after})


@expect("killed_connection")
def _(o):
    assert o["held_while_killed"], "the pg_sleep task's backend was found and terminated"
    created, held, *after = [brief(t) for t in o["tasks"]]
    assert created == ok({"sku": "kill-gear", "name": "Gear", "stock": 4})
    assert held["state"] == "FAILURE" and held["stored"]["exc_type"] == "OperationalError", held
    assert held["stored"]["exc_module"] == "django.db.utils", held
    assert "terminating connection due to administrator command" in held["stored"]["exc_message"][0], held
    assert after == [ok(4)] * 6 + [dict(ok({"sku": "kill-gear", "quantity": 1, "stock_left": 3}), children=[
        ok({"sku": "kill-gear", "quantity": 1, "status": "confirmed", "updated": 1})])], after
    assert o["db"] == {"products": [["kill-gear", "Gear", 3]], "orders": [["kill-gear", 1, "confirmed"]]}


# --- the tests ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CASES)
def test_celery_baseline(name, pair):
    """Celery's observation has the expected values: proves the project and the harness."""
    obs = side_of(pair.observe(name), "celery")["normalized"]
    assert "incomplete" not in obs, obs
    CASES[name].expect(copy.deepcopy(obs))


def show(task):
    """One line for a task outcome: its state and value, or its exception; then its children's."""
    if task.get("state") == "FAILURE":
        stored = task.get("stored") or {}
        message = " ".join(str(m) for m in stored.get("exc_message") or [])
        text = f"FAILURE {stored.get('exc_module')}.{stored.get('exc_type')}: {message}"
    else:
        text = f"{task.get('state')} {task.get('result')!r}"
    text = text.replace("\n", "\\n")
    text = text if len(text) <= 240 else text[:240] + "..."
    children = task.get("children")
    return text + (f" -> [{'; '.join(show(c) for c in children)}]" if children else "")


def summary(celery, celeriac):
    """Where two observations differ: task by task (one line each side), the database rows, other keys."""
    lines = []
    left, right = celery.get("tasks", []), celeriac.get("tasks", [])
    for i in range(max(len(left), len(right))):
        a = left[i] if i < len(left) else None
        b = right[i] if i < len(right) else None
        if a != b:
            lines.append(f"task {i}:\n    celery:   {show(a) if a else '<none>'}\n"
                         f"    celeriac: {show(b) if b else '<none>'}")
    rest = list(differences({k: v for k, v in celery.items() if k != "tasks"},
                            {k: v for k, v in celeriac.items() if k != "tasks"}))
    if rest:
        lines.append(describe_differences(rest, limit=400))
    return "\n".join(lines)


@pytest.mark.parametrize("name", CASES)
def test_same_outcome(name, pair):
    """celeriac's observation (task outcomes and database rows) equals Celery's, after normalization."""
    both = pair.observe(name)
    celery = side_of(both, "celery")["normalized"]
    celeriac = side_of(both, "celeriac")["normalized"]
    if celery != celeriac:
        diagnostics = {k: side_of(both, k)["raw"].get("_diagnostic") for k in ("celery", "celeriac")}
        pytest.fail(f"celeriac differs from celery ({pair.variant} settings):\n{summary(celery, celeriac)}" + (
            f"\ndiagnostics: {diagnostics}" if any(diagnostics.values()) else ""))


@pytest.mark.parametrize("kind", PROGRAMS)
def test_startup_log_clean(kind, pair):
    """The worker starts without a signal receiver raising: Celery's Django fixup (worker_init,
    worker_process_init) and the project's database check log no AttributeError and no traceback."""
    side = pair.sides[kind]
    assert side.startup_log is not None, side.error
    problems = [line for line in side.startup_log.splitlines() if any(p in line for p in STARTUP_LOG_PROBLEMS)]
    assert not problems, f"{kind} worker's startup log:\n{side.startup_log[-4000:]}"
    side.require()


@pytest.mark.parametrize("kind", PROGRAMS)
def test_worker_init_db_check(kind, pair):
    """The project's worker_init receiver reached the database from the worker's main process, before the
    pool processes started."""
    side = pair.sides[kind]
    side.require()
    lines = read_jsonl(side.signal_log)
    inits = [s for s in lines if s["signal"] == "worker_init"]
    assert [s.get("db_check") for s in inits] == ["ok"], inits
    children = [s for s in lines if s["signal"] == "worker_process_init"]
    assert len(children) >= CONCURRENCY and all(s["pid"] != inits[0]["pid"] for s in children), lines
    assert inits[0]["time"] <= min(s["time"] for s in children), lines
