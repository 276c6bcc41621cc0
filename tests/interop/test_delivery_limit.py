"""A quorum queue's delivery limit (`x-delivery-limit`) and celeriac's own
poison quarantine (`--max-task-deaths`), on the private RabbitMQ 4.x node
(Debian trixie's 4.0.5 here, not 4.3).

What celeriac sends is in docs/operations.md ("delivery limits"): hand-backs
at a drain are `basic.nack requeue=true`, poison messages end with
`basic.reject requeue=false`, and a process that dies holding a message
leaves it to the broker. Measured on 4.0.5 (and 3.10.8): every return counts
— nack, reject and a closed channel alike — so on 4.0-4.2 each drain costs a
handed-back message one delivery attempt, exactly one. 4.3 stops counting
`basic.nack requeue=true`; the test says so when it runs on one."""

import json
import pathlib
import re
import signal
import sys
import time
import urllib.request

import amqp
import pytest

from conftest import REDIS_URL, amqp_channel, celery_app, wait_until


def version_tuple(text):
    return tuple(int(part) for part in text.split("-")[0].split(".")[:3])


def limited_args(queue, limit):
    return {"x-queue-type": "quorum", "x-delivery-limit": limit, "x-dead-letter-exchange": queue + ".dlx"}


def limited_app(node, queue, limit, backend):
    """A Celery client that declares the queue as it is."""
    from kombu import Exchange, Queue
    app = celery_app(queue, backend, broker=node.url)
    app.conf.task_queues = [Queue(queue, Exchange(queue), routing_key=queue,
                                  queue_arguments=limited_args(queue, limit))]
    return app


def declare_limited(node, queue, limit):
    """A quorum queue with `limit` and a dead-letter queue `<queue>.dlq`."""
    with amqp_channel(node.url) as ch:
        ch.exchange_declare(queue, "direct", durable=True, auto_delete=False)
        ch.exchange_declare(queue + ".dlx", "fanout", durable=True, auto_delete=False)
        ch.queue_declare(queue + ".dlq", durable=True, auto_delete=False)
        ch.queue_bind(queue + ".dlq", queue + ".dlx", "")
        ch.queue_declare(queue, durable=True, auto_delete=False, arguments=limited_args(queue, limit))
        ch.queue_bind(queue, queue, queue)


def get_all(node, queue, expected, timeout=20):
    """Takes `expected` messages from `queue` (acknowledging them)."""
    got = []
    deadline = time.monotonic() + timeout
    with amqp_channel(node.url) as ch:
        while len(got) < expected and time.monotonic() < deadline:
            m = ch.basic_get(queue)
            if m is None:
                time.sleep(0.1)
                continue
            ch.basic_ack(m.delivery_tag)
            got.append(m)
    return got


@pytest.fixture
def limited(rabbit4, queue_name):
    yield rabbit4
    with amqp_channel(rabbit4.url) as ch:
        for q in (queue_name + ".dlq",):
            try:
                ch.queue_delete(q)
            except amqp.exceptions.AMQPError:
                pass
    with amqp_channel(rabbit4.url) as ch:
        try:
            ch.exchange_delete(queue_name + ".dlx")
        except amqp.exceptions.AMQPError:
            pass


def test_a_drain_hands_back_with_one_count_each(limited, start_worker, queue_name):
    """A limit of 1: one hand-back leaves each message deliverable, and on
    4.0-4.2 it shows as x-delivery-count 1 (counted once, not per consumer or
    channel); on 4.3 and later, not at all."""
    node = limited
    version = node.server_properties()["version"]
    declare_limited(node, queue_name, 1)
    w = start_worker("-c", "1", "--acks-late", "--result-backend", "rpc://", broker=node.url)
    app = limited_app(node, queue_name, 1, "rpc://")
    try:
        app.send_task("celeriac.sleep", (3,))
        w.wait_for_log("celeriac.sleep[")
        ids = [app.send_task("celeriac.add", (i, i)).id for i in range(3)]
        wait_until(lambda: all(f"[{i}] received" in w.log() for i in ids), what="quick tasks prefetched")
        w.send(signal.SIGTERM)
        assert w.proc.wait(30) == 0
        assert "Returned 3 unstarted message(s) to the broker" in w.log(), w.log()[-3000:]
        back = get_all(node, queue_name, 3)
        counts = sorted(m.headers.get("x-delivery-count", 0) for m in back)
        assert sorted(m.headers["id"] for m in back) == sorted(ids)
        print(f"RabbitMQ {version}: x-delivery-count of handed-back messages {counts}")
        if version_tuple(version) >= (4, 3, 0):
            assert counts == [0, 0, 0], "4.3 does not count basic.nack requeue=true"
        else:
            assert counts == [1, 1, 1], "4.0-4.2 count every requeue once"
        assert get_all(node, queue_name + ".dlq", 1, timeout=1) == [], "nothing was dropped at the limit"
    finally:
        app.close()


def test_poison_is_quarantined_by_celeriac_before_the_brokers_limit(limited, start_worker, queue_name,
                                                                    redis_client):
    """x-delivery-limit 5, --max-task-deaths 3, --reject-on-worker-lost (so a
    redelivered message runs again): each death is a return the
    broker counts; celeriac rejects the message without requeue on its 4th
    delivery (3 deaths), before the limit, so it is dead-lettered as
    `rejected` with its FAILURE stored."""
    node = limited
    declare_limited(node, queue_name, 5)
    w = start_worker("-c", "1", "--acks-late", "--reject-on-worker-lost", "--with-test-tasks", "--result-backend", REDIS_URL,
                     broker=node.url)
    app = limited_app(node, queue_name, 5, REDIS_URL)
    try:
        r = app.send_task("celeriac.test.crash")
        w.wait_for_log("killed its task process 3 times", timeout=60)
        dead = get_all(node, queue_name + ".dlq", 1)
        assert len(dead) == 1
        death = dead[0].headers["x-death"][0]
        assert death["reason"] == "rejected", death
        assert death["queue"] == queue_name and death["count"] == 1, death
        # Three deaths, each a return the broker counted (3 < 5: its limit never fired).
        assert w.log().count("while running it (3 time(s))") == 1, w.log()[-3000:]
        assert "delivery_limit" not in json.dumps(dead[0].headers, default=str)
        meta = json.loads(redis_client.get(f"celery-task-meta-{r.id}"))
        assert meta["status"] == "FAILURE" and meta["result"]["exc_type"] == "WorkerLostError", meta
    finally:
        app.close()


APPS = pathlib.Path(__file__).parent / "pyapps"
CELERIAC = pathlib.Path(sys.executable).parent / "celeriac"


def test_a_message_handed_back_at_the_limit_is_re_published_not_dropped(limited, start_worker, queue_name,
                                                                          tmp_path):
    """x-delivery-limit 1, declared by the app (limitapp): an ETA task held by a
    process that recycles after each task (--max-tasks-per-child 1) is handed
    back at every recycle. Before RabbitMQ 4.3 each requeue counts, so the
    second would take it past the limit and the broker would dead-letter it
    (`delivery_limit`) though it never ran. celeriac re-publishes it instead
    (the count starts again), with a WARNING line and a counted metric; the
    task is received again and nothing is dead-lettered."""
    node = limited
    version = node.server_properties()["version"]
    declare_limited(node, queue_name, 1)
    env = {"LIMITAPP_BROKER": node.url, "LIMITAPP_BACKEND": REDIS_URL, "LIMITAPP_QUEUE": queue_name,
           "LIMITAPP_LIMIT": "1"}
    w = start_worker("-A", "limitapp", "--workdir", str(APPS), "-c", "1", "--max-tasks-per-child", "1",
                     "--metrics-bind", "127.0.0.1:0", env=env, broker=node.url, binary=str(CELERIAC))
    app = limited_app(node, queue_name, 1, REDIS_URL)
    try:
        held = app.send_task("limitapp.add", (1, 1), countdown=600).id
        for round in (1, 2, 3):
            w.wait_for_log(f"[{held}] received", count=round, timeout=30)
            # One task makes the process recycle, handing the held one back.
            assert app.send_task("limitapp.add", (round, round)).get(timeout=30) == 2 * round
        w.wait_for_log(f"[{held}] received", count=4, timeout=30)
        log = w.log()
        limit_line = f"Task limitapp.add[{held}] was returned to queue {queue_name} 1 time(s), its delivery limit (1)"
        url = re.search(r"metrics on (http://\S+)", log).group(1)
        with urllib.request.urlopen(url, timeout=5) as r:
            metrics = r.read().decode()
        republished = int(float(re.search(r"^celeriac_hand_backs_republished_total (\S+)$", metrics, re.M).group(1)))
        if version_tuple(version) >= (4, 3, 0):
            # 4.3 does not count requeues: every hand-back is a plain requeue.
            assert limit_line not in log and republished == 0, (log[-3000:], metrics)
        else:
            # Round 2 meets it at count 1 (round 1's requeue) and re-publishes;
            # round 3 requeues the copy, whose count started again at 0.
            assert log.count(limit_line) == 1, log[-5000:]
            assert republished == 1, metrics
        assert get_all(node, queue_name + ".dlq", 1, timeout=2) == [], "nothing was dead-lettered"
    finally:
        app.close()
