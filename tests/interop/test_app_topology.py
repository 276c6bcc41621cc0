"""What an app nobody here wrote expects of the broker, checked against
`celery worker` as the judge:

- its queues are declared exactly as kombu declares them from the app's
  `task_queues` (arguments, flags, exchanges, extra bindings, consumer
  arguments), so the app's own producers never meet PRECONDITION_FAILED;
- an exchange that already exists as another type is used as the type it
  has: countdown tasks a producer routes through RabbitMQ's delay levels
  arrive instead of being dropped by the broker;
- a task's print() becomes a log record, as `worker_redirect_stdouts` says;
- a worker_init receiver that starts a thread is refused in one line that
  names it."""

import difflib
import json
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest
import redis as redis_lib
from celery import Celery
from kombu import Exchange, Queue

from conftest import BROKER, REDIS_URL, amqp_channel, celery_app, queue_depth, wait_until
from pyapp_harness import AppWorker, clean_env

APPS = pathlib.Path(__file__).parent / "pyapps"
BIN = pathlib.Path(sys.executable).parent
PROGRAMS = {"celery": BIN / "celery", "celeriac": BIN / "celeriac"}


def rabbitmqctl(*args):
    out = subprocess.run(["rabbitmqctl", "-q", *args, "--formatter", "json"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    return json.loads(out or "[]")


def start(side, prefix, tmp_path, *extra):
    env = clean_env()
    env.update(TOPOAPP_QUEUE=prefix, TOPOAPP_BROKER=BROKER, TOPOAPP_BACKEND=REDIS_URL,
               CELERIAC_STATE_DIR=str(tmp_path / f"state-{side}"))
    argv = ["-A", "topoapp", "--workdir", str(APPS), "worker", "--pool", "prefork", "-c", "2", "-l", "INFO",
            "-n", f"{side}-{prefix}@%h", "--without-mingle", "--without-gossip", *extra]
    if side == "celeriac":
        argv += ["--metrics-bind", "none"]
    return AppWorker(PROGRAMS[side], argv, env, tmp_path / f"{side}.log", cwd=str(APPS))


def wait_ready(w, side, prefix, timeout=60):
    """Until the worker consumes both of the app's queues."""
    def consuming():
        if not w.alive():
            raise AssertionError(f"{side} worker exited:\n{w.log()}")
        names = {c["queue_name"] for c in rabbitmqctl("list_consumers", "queue_name")}
        return {prefix, prefix + ".b"} <= names
    wait_until(consuming, timeout, f"{side} consuming")


def topology(prefix):
    """What the broker holds for the app's queues, with the prefix taken out."""
    def norm(value):
        value = json.loads(json.dumps(value).replace(prefix, "Q"))
        for group in ("queues", "exchanges", "bindings"):
            for entry in value[group]:
                entry["arguments"].sort()  # the broker lists them in the order given
        return value

    queues = [q for q in rabbitmqctl("list_queues", "name", "durable", "auto_delete", "exclusive", "arguments")
              if q["name"] in (prefix, prefix + ".b")]
    exchanges = [e for e in rabbitmqctl("list_exchanges", "name", "type", "durable", "auto_delete", "arguments")
                 if e["name"].startswith(prefix)]
    bindings = [b for b in rabbitmqctl("list_bindings", "source_name", "destination_name", "routing_key",
                                       "arguments")
                if b["destination_name"] in (prefix, prefix + ".b") and b["source_name"]]
    consumers = {c["queue_name"]: c["arguments"] for c in rabbitmqctl("list_consumers", "queue_name", "arguments")
                 if c["queue_name"] in (prefix, prefix + ".b")}
    key = lambda d: json.dumps(d, sort_keys=True)  # noqa: E731
    return norm({
        "queues": sorted(queues, key=key),
        "exchanges": sorted(exchanges, key=key),
        "bindings": sorted(bindings, key=key),
        "consumer_arguments": consumers,
    })


def delete_topology(prefix):
    with amqp_channel() as ch:
        for q in (prefix, prefix + ".b", prefix + ".dlq"):
            ch.queue_delete(q)
        for x in (prefix, prefix + ".x", prefix + ".b1", prefix + ".b2", prefix + ".dlx"):
            ch.exchange_delete(x)


def client(prefix):
    """The app's own producer: the same definitions, so the same task_queues."""
    sys.path.insert(0, str(APPS))
    try:
        from topoapp.celery import make_app
    finally:
        sys.path.remove(str(APPS))
    app = make_app(prefix)
    app.conf.broker_url, app.conf.result_backend = BROKER, REDIS_URL
    return app


def arguments(entry):
    """rabbitmqctl's [name, type, value] triples as {name: value}."""
    return {name: value for name, _type, value in entry["arguments"]}


def observe(side, tmp_path):
    prefix = f"topo-{side}-{uuid.uuid4().hex[:6]}"
    with amqp_channel() as ch:
        # The dead letters' destination (kombu does not declare it).
        ch.exchange_declare(prefix + ".dlx", "direct", durable=True, auto_delete=False)
        ch.queue_declare(prefix + ".dlq", durable=True, auto_delete=False)
        ch.queue_bind(prefix + ".dlq", prefix + ".dlx", "dead")
    w = start(side, prefix, tmp_path)
    try:
        wait_ready(w, side, prefix)
        seen = topology(prefix)
        app = client(prefix)
        # The producer declares the queue as the app defines it (kombu's
        # declare on publish): refused with PRECONDITION_FAILED if the
        # worker declared it otherwise.
        assert app.send_task("topoapp.add", (2, 3)).get(timeout=30) == 5
        assert app.tasks["topoapp.shout"].delay(f"shouted by {side}").get(timeout=30) == f"shouted by {side}"
        app.send_task("topoapp.refuse")
        wait_until(lambda: queue_depth(prefix + ".dlq") >= 1, 30, "the rejected task dead-lettered")
        seen["dead_lettered"] = queue_depth(prefix + ".dlq")
        wait_until(lambda: "shouted by" in w.log(), 10, "the printed line logged")
        line = next(l for l in w.log().splitlines() if f"shouted by {side}" in l)
        seen["print_logged_as"] = "WARNING/ForkPoolWorker-" in line
        app.close()
        return seen, w.log()
    finally:
        w.stop(signal.SIGTERM)
        delete_topology(prefix)


def test_queues_are_declared_as_kombu_declares_them_and_print_is_logged(tmp_path):
    celery_seen, _ = observe("celery", tmp_path)
    celeriac_seen, log = observe("celeriac", tmp_path)
    # The judge says what the broker holds; the facts this test is about:
    queue = arguments(next(q for q in celery_seen["queues"] if q["name"] == "Q"))
    assert queue["x-dead-letter-exchange"] == "Q.dlx" and queue["x-message-ttl"] == 600000, queue
    assert queue["x-single-active-consumer"] is True and queue["x-max-length"] == 10000, queue
    assert arguments({"arguments": celery_seen["consumer_arguments"]["Q"]}) == {"x-priority": 7}
    assert celery_seen["dead_lettered"] == 1 and celery_seen["print_logged_as"] is True
    diff = "\n".join(difflib.unified_diff(
        json.dumps(celery_seen, indent=1, sort_keys=True).splitlines(),
        json.dumps(celeriac_seen, indent=1, sort_keys=True).splitlines(), "celery", "celeriac", lineterm=""))
    assert celeriac_seen == celery_seen, diff + "\n" + log[-3000:]
    assert "PRECONDITION_FAILED" not in log


def test_an_existing_topic_exchange_is_adopted_so_countdown_tasks_arrive(start_worker, queue_name):
    """The exchange exists as topic (a Celery >= 5.5 producer set up for
    quorum queues declared it); the worker is configured with the default
    (direct). Countdown tasks the producer sends through the delay levels
    must still reach the queue."""
    with amqp_channel() as ch:
        ch.exchange_declare(queue_name, "topic", durable=True, auto_delete=False)
    w = start_worker("-c", "1", "--queue-type", "quorum", "--result-backend", REDIS_URL)
    w.wait_for_log("native delayed delivery declared for quorum queues")
    assert f"exchange {queue_name} exists as a topic exchange, not direct" in w.log()
    app = celery_app(queue_name, REDIS_URL)
    app.conf.task_queues = [Queue(queue_name, Exchange(queue_name, type="topic"), routing_key=queue_name,
                                  queue_arguments={"x-queue-type": "quorum"})]
    r = app.send_task("celeriac.echo", ("later",), countdown=2)
    assert r.get(timeout=30) == "later"
    assert f"[{r.id}] received" in w.log()
    app.close()


def test_a_worker_init_receiver_that_starts_a_thread_is_refused_naming_it(tmp_path):
    p = subprocess.run([str(PROGRAMS["celeriac"]), "-A", "initthreadapp", "worker", "--workdir", str(APPS),
                        "--metrics-bind", "none", "--state-dir", str(tmp_path / "state")],
                       capture_output=True, text=True, timeout=60, env=clean_env())
    assert p.returncode != 0
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, p.stderr
    assert "a worker_init or celeryd_after_setup receiver started 1 thread(s) (pool-worker)" in lines[0], lines[0]
    assert "importing the app" not in lines[0]


def test_a_retry_no_queue_would_take_is_logged_and_dead_lettered_not_dropped(start_worker, queue_name):
    """The task came through an exchange whose binding is gone by the time
    it retries: the broker would drop the re-published retry without a word.
    Published as mandatory, it comes back, and the worker says so and
    rejects the original, which the queue dead-letters."""
    with amqp_channel() as ch:
        ch.exchange_declare(queue_name + ".dlx", "fanout", durable=True, auto_delete=False)
        ch.queue_declare(queue_name + ".dlq", durable=True, auto_delete=False)
        ch.queue_bind(queue_name + ".dlq", queue_name + ".dlx", "")
        ch.queue_declare(queue_name, durable=True, auto_delete=False,
                         arguments={"x-dead-letter-exchange": queue_name + ".dlx"})
        ch.exchange_declare(queue_name + ".in", "direct", durable=True, auto_delete=False)
        ch.queue_bind(queue_name, queue_name + ".in", "k")
    app = celery_app(queue_name)
    app.conf.task_queues = [Queue(queue_name, Exchange(queue_name + ".in"), routing_key="k",
                                  queue_arguments={"x-dead-letter-exchange": queue_name + ".dlx"})]
    r = app.send_task("celeriac.retry", (1,), {"countdown": 0}, exchange=queue_name + ".in", routing_key="k")
    wait_until(lambda: queue_depth(queue_name) == 1, 10, "the task queued")
    with amqp_channel() as ch:
        ch.queue_unbind(queue_name, queue_name + ".in", "k")
    w = start_worker("-c", "1", "--acks-late", "--metrics-bind", "127.0.0.1:0")
    w.wait_for_log("could not be re-published for retry", timeout=30)
    line = next(l for l in w.log().splitlines() if "could not be re-published for retry" in l)
    assert r.id in line and "unroutable" in line, line
    wait_until(lambda: queue_depth(queue_name + ".dlq") == 1, 20, "the original dead-lettered")
    # ... and counted.
    url = re.search(r"metrics on (http://\S+)", w.log()).group(1)
    with urllib.request.urlopen(url, timeout=5) as scraped:
        text = scraped.read().decode()
    assert 'celeriac_task_messages_unpublished_total{kind="retry"} 1\n' in text, text
    app.close()
    with amqp_channel() as ch:
        ch.queue_delete(queue_name + ".dlq")
        ch.exchange_delete(queue_name + ".dlx")
        ch.exchange_delete(queue_name + ".in")


@pytest.mark.parametrize("side", ["celery", "celeriac"])
def test_an_unregistered_task_is_stored_by_the_apps_backend(side, tmp_path):
    """Celery's consumer stores NotRegistered with the app's backend: here a
    Redis backend with a key prefix of its own, which only the app knows."""
    queue = f"unreg-{side}-{uuid.uuid4().hex[:6]}"
    prefix = f"pfx{uuid.uuid4().hex[:4]}_"
    env = clean_env()
    env.update(SETTINGSAPP_BROKER=BROKER, SETTINGSAPP_BACKEND=REDIS_URL, SETTINGSAPP_QUEUE=queue,
               SETTINGSAPP_CONF=json.dumps({"result_backend_transport_options": {"global_keyprefix": prefix}}),
               CELERIAC_STATE_DIR=str(tmp_path / "state"))
    argv = ["-A", "settingsapp", "--workdir", str(APPS), "worker", "--pool", "prefork", "-c", "1", "-l", "INFO",
            "-Q", queue, "-n", f"{queue}@%h", "--without-mingle", "--without-gossip"]
    if side == "celeriac":
        argv += ["--metrics-bind", "none"]
    w = AppWorker(PROGRAMS[side], argv, env, tmp_path / f"{side}.log", cwd=str(APPS))
    client = Celery("client", broker=BROKER, backend=REDIS_URL)
    client.conf.task_default_queue = queue
    client.conf.result_backend_transport_options = {"global_keyprefix": prefix}
    r = redis_lib.Redis.from_url(REDIS_URL)
    try:
        wait_until(lambda: w.alive() and queue in {c["queue_name"] for c in rabbitmqctl("list_consumers",
                                                                                        "queue_name")},
                   60, f"{side} consuming")
        res = client.send_task("settingsapp.nowhere", (1,))
        key = f"{prefix}celery-task-meta-{res.id}"
        wait_until(lambda: r.exists(key), 20, f"{key} stored")
        meta = json.loads(r.get(key))
        assert meta["status"] == "FAILURE" and meta["result"]["exc_type"] == "NotRegistered", meta
        assert meta["result"]["exc_message"] == ["settingsapp.nowhere"], meta
        assert not r.exists(f"celery-task-meta-{res.id}"), "stored without the app's prefix"
    finally:
        w.stop(signal.SIGTERM)
        client.close()
        with amqp_channel() as ch:
            ch.queue_delete(queue)
            ch.exchange_delete(queue)
