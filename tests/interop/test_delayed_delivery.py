"""RabbitMQ's native delayed delivery with quorum queues, as Celery >= 5.5
producers use it: a countdown/ETA task for a quorum queue behind a topic
exchange is published to `celery_delayed_27` and waits in the broker, which
only works when the worker has declared the delay levels (Celery's worker
does; celeriac does with --queue-type quorum). The task must run on time,
never early, on RabbitMQ 3.x (the shared broker) and 4.x (a private node)."""

import json
from datetime import datetime, timedelta, timezone

import pytest
import redis as redis_lib
from kombu import Exchange, Queue

from conftest import BROKER, REDIS_URL, amqp_channel, celery_app


def quorum_topic_app(queue, broker):
    app = celery_app(queue, REDIS_URL, broker=broker)
    app.conf.task_queues = [
        Queue(queue, Exchange(queue, type="topic"), routing_key=queue, queue_arguments={"x-queue-type": "quorum"})
    ]
    return app


def done_at(task_id):
    meta = json.loads(redis_lib.Redis.from_url(REDIS_URL).get(f"celery-task-meta-{task_id}"))
    return datetime.fromisoformat(meta["date_done"]).replace(tzinfo=timezone.utc)


def check_delayed_tasks_run_on_time(start_worker, queue, broker):
    w = start_worker("-c", "1", "--queue-type", "quorum", "--exchange-type", "topic", "--result-backend", REDIS_URL,
                     broker=broker)
    w.wait_for_log("native delayed delivery declared for quorum queues")
    app = quorum_topic_app(queue, broker)
    sent = datetime.now(timezone.utc)
    sent_local = datetime.now()  # log lines carry local time
    by_countdown = app.send_task("celeriac.echo", ("countdown",), countdown=3)
    eta = sent + timedelta(seconds=4.5)
    by_eta = app.send_task("celeriac.echo", ("eta",), eta=eta)
    assert by_countdown.get(timeout=30) == "countdown"
    assert by_eta.get(timeout=30) == "eta"
    # They waited in the broker's delay levels, not in the worker's memory:
    # the worker received the countdown task only when it was (nearly) due.
    line = next(l for l in w.log().splitlines() if f"[{by_countdown.id}] received" in l)
    received = datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f")
    assert received >= sent_local + timedelta(seconds=2.5), (sent_local, line)
    with amqp_channel(broker) as ch:
        ch.exchange_declare("celery_delayed_27", "topic", passive=True)
        ch.queue_declare("celery_delayed_0", passive=True)
    # ... and ran on time, never early (the delay is whole seconds, so a
    # message arrives up to a second before its eta and is held until then).
    assert done_at(by_countdown.id) >= sent + timedelta(seconds=3)
    assert done_at(by_eta.id) >= eta
    assert done_at(by_eta.id) < eta + timedelta(seconds=3)
    app.close()


def test_countdown_and_eta_tasks_through_the_broker_on_rabbitmq3(start_worker, queue_name):
    check_delayed_tasks_run_on_time(start_worker, queue_name, BROKER)


def test_countdown_and_eta_tasks_through_the_broker_on_rabbitmq4(start_worker, rabbit4, queue_name):
    check_delayed_tasks_run_on_time(start_worker, queue_name, rabbit4.url)


def test_retries_of_a_task_that_came_through_the_delay_levels_arrive(start_worker, queue_name):
    """A task delivered from `celery_delayed_delivery` (its routing key
    carrying the delay prefix) retries three times: each retry is re-published
    to the queue's own exchange with the prefix stripped, and arrives."""
    w = start_worker("-c", "1", "--queue-type", "quorum", "--exchange-type", "topic", "--result-backend", REDIS_URL)
    w.wait_for_log("native delayed delivery declared for quorum queues")
    app = quorum_topic_app(queue_name, BROKER)
    r = app.send_task("celeriac.retry", (3,), {"countdown": 0}, countdown=1)
    assert r.get(timeout=60) == 3
    assert w.log().count(f"[{r.id}] retry: Retry in 0s") == 3, w.log()[-2000:]
    assert "could not be re-published" not in w.log()
    app.close()


def test_countdown_retries_wait_in_the_broker_not_in_the_worker(start_worker, queue_name):
    """On a quorum queue behind a topic exchange a retry with a countdown is
    sent through the delay levels, as a Celery producer would send it: the
    retried message reaches the worker only when it is due (so it does not
    sit in a task process's prefetch, which a quorum queue cannot raise)."""
    w = start_worker("-c", "1", "--queue-type", "quorum", "--exchange-type", "topic", "--result-backend", REDIS_URL,
                     "-l", "DEBUG")
    w.wait_for_log("native delayed delivery declared for quorum queues")
    app = quorum_topic_app(queue_name, BROKER)
    r = app.send_task("celeriac.retry", (2,), {"countdown": 2})
    assert r.get(timeout=60) == 2
    lines = [l for l in w.log().splitlines() if f"[{r.id}]" in l and ("received" in l or "retry: Retry" in l)]
    stamps = [datetime.strptime(l[1:24], "%Y-%m-%d %H:%M:%S,%f") for l in lines]
    kinds = ["received" if "received" in l else "retry" for l in lines]
    assert kinds == ["received", "retry", "received", "retry", "received"], lines
    for retry_at, received_at in ((stamps[1], stamps[2]), (stamps[3], stamps[4])):
        # Received only when due (whole seconds through the levels), not at once.
        assert received_at - retry_at >= timedelta(seconds=1.5), lines
    app.close()
