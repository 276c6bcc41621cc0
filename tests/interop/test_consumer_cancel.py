"""A worker must never stay alive without consuming. When the broker cancels
a consumer (its queue deleted; on RabbitMQ 4.x also a consumer timeout on a
quorum queue), the task process re-declares the queue and consumes again;
readiness is false meanwhile and true again after, and the event is logged
once and counted. When no cancel notice reaches the process, an idle process
finds out by itself at its next beat (a passive declare of each consumed
queue). Run on RabbitMQ 3.x and 4.x."""

import re
import time

from conftest import BROKER, amqp_channel, celery_app, node_of, own_connections, probe, wait_until


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


def unacked(queue):
    import subprocess
    out = subprocess.run(["rabbitmqctl", "list_queues", "name", "messages_unacknowledged", "--silent"],
                         check=True, capture_output=True, text=True, timeout=120).stdout
    return next((int(n) for name, n in (l.split("\t") for l in out.splitlines() if "\t" in l) if name == queue), None)


def test_a_cancel_on_one_queue_gives_up_the_connection_and_loses_nothing(start_worker, queue_name, redis_client):
    """One process consumes two queues on one connection, and the broker cancels the consumer of
    one (the queue is deleted). The process gives that connection up and closes it, as Celery
    does: the messages of the other queue it had received and not started go back through the
    broker and run once each on the new connection, and the old connection does not linger
    (left open, it held them unacknowledged until the broker's consumer timeout)."""
    other = f"{queue_name}-other"
    key = f"cancel-two-queues-{queue_name}"
    w = start_worker("--with-test-tasks", "-c", "1", "--prefetch-multiplier", "8", queue=f"{queue_name},{other}")
    node = node_of(w)
    wait_until(lambda: len(own_connections(node)) == 2, timeout=20, what="task and control connections")
    app = celery_app(other)
    try:
        long = app.send_task("celeriac.test.record", (key, "long", 3))
        w.wait_for_log(f"[{long.id}] received")
        for i in range(6):
            app.send_task("celeriac.test.record", (key, f"quick{i}", 0))
        wait_until(lambda: unacked(other) == 6, timeout=10, what="six messages received and waiting")
        with amqp_channel(BROKER) as ch:
            ch.queue_delete(queue_name)
        expected = {"long": 1, **{f"quick{i}": 1 for i in range(6)}}

        def counts():
            return {k.decode(): int(v) for k, v in redis_client.hgetall(key).items()}

        wait_until(lambda: counts() == expected, timeout=30, what=f"every task once: {expected}")
        wait_until(lambda: len(own_connections(node)) == 2, timeout=20,
                   what="the given-up connection closed")
        time.sleep(2)
        assert counts() == expected, "no task ran twice"
        assert unacked(other) == 0
        log = w.log()
        assert log.count("was cancelled by the broker") == 1, log[-3000:]
        assert "PRECONDITION_FAILED" not in log, log[-3000:]
    finally:
        redis_client.delete(key)
        app.close()
        with amqp_channel(BROKER) as ch:
            ch.queue_delete(other)
