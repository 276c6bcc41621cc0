"""An acks-late task longer than the broker's delivery-acknowledgement
timeout (`consumer_timeout`), with quick tasks queued behind it, on private
nodes whose timeout is 3 s: RabbitMQ 3.10.8 (classic queue) and RabbitMQ
4.0.5 (quorum queue). Both close the consumer's channel with 406
PRECONDITION_FAILED and requeue what was unacknowledged on it; 3.x checks
only every `channel_tick_interval`, set to 500 ms in the nodes' advanced.config.

What the worker must do: run the long task once and store its result once
(the redelivered copy is acknowledged without running), let the quick tasks
that were prefetched behind it run at once in the other process, not loop,
and log one line naming the setting to change, counted in /metrics."""

import json
import re
import threading
import time
import urllib.request
import uuid

import pytest
import redis as redis_lib

from conftest import REDIS_URL, RABBITMQ_4_3_RULES, celery_app, delete_test_queue, wait_until
from private_broker import rabbitmq4_install

TIMEOUT_MS = 3000
LONG_SECONDS = 8.0
QUICK = 6
NODE_CONFIG = f"consumer_timeout = {TIMEOUT_MS}"
TICK = "[{rabbit, [{channel_tick_interval, 500}]}]."


@pytest.fixture
def timeout_node3(private_rabbit, queue_name):
    node = private_rabbit("ctimeout3", config=NODE_CONFIG, advanced=TICK)
    yield node
    delete_test_queue(node, queue_name)


@pytest.fixture
def timeout_node4(private_rabbit, queue_name):
    install = rabbitmq4_install()
    node = private_rabbit("ctimeout4", server=install["RABBITMQ4_SERVER"], ctl=install["RABBITMQ4_CTL"],
                          epmd=install["RABBITMQ4_EPMD"], config=RABBITMQ_4_3_RULES + "\n" + NODE_CONFIG,
                          advanced=TICK)
    yield node
    delete_test_queue(node, queue_name)


class Published:
    """Counts what the Redis backend publishes for one task id (it
    publishes each stored result on the result's key)."""

    def __init__(self, task_id):
        self.client = redis_lib.Redis.from_url(REDIS_URL)
        self.pubsub = self.client.pubsub()
        self.pubsub.subscribe(f"celery-task-meta-{task_id}")
        self.states = []
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self._stop:
            m = self.pubsub.get_message(timeout=0.2)
            if m and m["type"] == "message":
                self.states.append(json.loads(m["data"])["status"])

    def close(self):
        self._stop = True
        self.thread.join(5)
        self.pubsub.close()
        self.client.close()


def unacked(node, queue):
    rows = json.loads(node.ctl("list_queues", "name", "messages_ready", "messages_unacknowledged",
                               "--formatter", "json", "--quiet"))
    row = next(r for r in rows if r["name"] == queue)
    return row["messages_ready"], row["messages_unacknowledged"]


def check_long_task(node, start_worker, queue, redis_client, *extra):
    version = node.server_properties()["version"]
    w = start_worker("-c", "2", "--acks-late", "--with-test-tasks", "--result-backend", REDIS_URL,
                     "--metrics-bind", "127.0.0.1:0", *extra, broker=node.url,
                     env={"CELERIAC_TEST_REDIS": REDIS_URL})
    app = celery_app(queue, REDIS_URL, broker=node.url)
    if "quorum" in extra:
        app.conf.task_default_queue_type = "quorum"
    key = f"celeriac-timeout-{uuid.uuid4().hex[:8]}"
    long_id = f"long-{uuid.uuid4().hex[:8]}"
    published = Published(long_id)
    try:
        time.sleep(0.3)  # the subscription is in place
        sent = time.monotonic()
        app.send_task("celeriac.test.record", (key, "long", LONG_SECONDS), task_id=long_id)
        w.wait_for_log(f"[{long_id}] received")
        quick = [f"quick{i}" for i in range(QUICK)]
        quick_sent = time.monotonic()
        for token in quick:
            app.send_task("celeriac.test.record", (key, token, 0))

        def counts():
            return {k.decode(): int(v) for k, v in redis_client.hgetall(key).items()}

        wait_until(lambda: set(quick) <= set(counts()), timeout=LONG_SECONDS, what="every quick task done")
        quick_took = time.monotonic() - quick_sent
        wait_until(lambda: "long" in counts(), timeout=LONG_SECONDS + 10, what="the long task done")
        long_took = time.monotonic() - sent
        time.sleep(TIMEOUT_MS / 1000 + 2)  # room for a copy to run, or to time out again
        log = w.log()
        print(f"RabbitMQ {version}: quick tasks done {quick_took:.1f} s after sending, "
              f"long task {long_took:.1f} s; results published for it: {published.states}")

        # The timeout happened, once, with quick tasks prefetched behind the long one.
        warning = re.findall(r"was not acknowledged within the broker's delivery acknowledgement timeout "
                             rf"\({TIMEOUT_MS} ms\).*prefetched message\(s\)", log)
        assert len(warning) == 1, log[-6000:]
        line = next(l for l in log.splitlines() if "delivery acknowledgement timeout" in l)
        assert f"[{long_id}]" in line and "WARNING" in line, line
        assert "`consumer_timeout` in rabbitmq.conf" in line and "`x-consumer-timeout`" in line, line
        held = int(re.search(r"with (\d+) prefetched message\(s\)", line).group(1))
        assert held >= 1, f"no quick task was held behind the long one, the test proves little: {line}"
        # The long task ran once and its result was stored once.
        assert counts()["long"] == 1, counts()
        assert published.states == ["SUCCESS"], published.states
        assert log.count(f"[{long_id}] succeeded") == 1, log[-6000:]
        assert log.count(f"[{long_id}] came back after its delivery timed out") == 1, log[-6000:]
        # The quick ones each ran once, without waiting for the long one.
        assert all(counts()[t] == 1 for t in quick), counts()
        assert quick_took < LONG_SECONDS - 1, f"quick tasks waited {quick_took:.1f} s"
        # Nothing loops: the queue is empty and nothing is held unacknowledged.
        assert unacked(node, queue) == (0, 0)
        assert log.count("delivery acknowledgement timeout") == 1
        url = re.search(r"metrics on (http://\S+)", log).group(1)
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        assert re.search(r"^celeriac_consumer_timeouts_total 1(\.0)?$", text, re.M), text
        # The process consumes again: a task afterwards runs.
        app.send_task("celeriac.test.record", (key, "after", 0))
        wait_until(lambda: "after" in counts(), timeout=20, what="a task after the timeout")
    finally:
        published.close()
        redis_client.delete(key)
        app.close()


def test_long_task_past_consumer_timeout_rabbitmq3(timeout_node3, start_worker, queue_name, redis_client):
    check_long_task(timeout_node3, start_worker, queue_name, redis_client)


def test_long_task_past_consumer_timeout_rabbitmq4_quorum(timeout_node4, start_worker, queue_name,
                                                          redis_client):
    check_long_task(timeout_node4, start_worker, queue_name, redis_client, "--queue-type", "quorum")
