"""A worker must never stay alive without consuming. When the broker cancels
a consumer (its queue deleted; on RabbitMQ 4.x also a consumer timeout on a
quorum queue), the task process re-declares the queue and consumes again;
readiness is false meanwhile and true again after, and the event is logged
once and counted. When no cancel notice reaches the process, an idle process
finds out by itself at its next beat (a passive declare of each consumed
queue). Run on RabbitMQ 3.x and 4.x."""

import re
import time

from conftest import BROKER, amqp_channel, celery_app, probe, wait_until


def check_consumer_comes_back(start_worker, queue, broker):
    w = start_worker("-c", "1", "--result-backend", "rpc://", "--metrics-bind", "127.0.0.1:0", broker=broker)
    app = celery_app(queue, "rpc://", broker=broker)
    assert app.send_task("celeriac.add", (1, 2)).get(timeout=20) == 3
    wait_until(lambda: probe("worker-readiness", w.state_dir)[0] == 0, what="ready")
    with amqp_channel(broker) as ch:
        # The queue is deleted, and a queue of the same name this connection holds exclusively
        # keeps the worker from declaring it again (RESOURCE_LOCKED) until the connection closes:
        # the time without a consumer lasts long enough to be seen, instead of a few milliseconds.
        ch.queue_delete(queue)
        ch.queue_declare(queue, exclusive=True)
        # Readiness drops while the process has no consumer ...
        wait_until(lambda: probe("worker-readiness", w.state_dir)[0] == 1, timeout=15,
                   what="not ready after the cancel")
    # ... and comes back once it consumes from the re-declared queue.
    wait_until(lambda: probe("worker-readiness", w.state_dir)[0] == 0, timeout=30, what="ready again")
    assert app.send_task("celeriac.add", (2, 2)).get(timeout=20) == 4, "nothing is lost after the cancel"
    log = w.log()
    # The broker's cancel notice, or (when none arrived: seen on a fresh RabbitMQ 4 node about one
    # run in ten) the idle process's own check of its queues: once either way.
    noticed = [line for line in log.splitlines()
               if "was cancelled by the broker" in line or "can no longer be consumed" in line]
    assert len(noticed) == 1, log[-3000:]
    url = re.search(r"metrics on (http://\S+)", log).group(1)
    import urllib.request
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    assert re.search(r"^celeriac_broker_reconnects_total 1(\.0)?$", text, re.M), text
    app.close()


def test_deleted_queue_is_consumed_again_rabbitmq3(start_worker, queue_name):
    check_consumer_comes_back(start_worker, queue_name, BROKER)


def test_deleted_queue_is_consumed_again_rabbitmq4(start_worker, rabbit4, queue_name):
    check_consumer_comes_back(start_worker, queue_name, rabbit4.url)
