"""Bad input gets a clear error and loses nothing: malformed messages are
rejected (dead-lettered when the queue has a DLX) with a log line naming the
message id, and the worker keeps going; bad flags fail at startup."""

import json
import os
import subprocess
import uuid

import amqp
import pytest
from kombu import Exchange, Queue

from conftest import amqp_channel, declare_with_dead_letters, queue_depth, wait_until, worker_binary


def publish_raw(queue, body, content_type="application/json", headers=None, correlation_id=None):
    props = {"content_type": content_type, "content_encoding": "utf-8", "delivery_mode": 2}
    if headers is not None:
        props["application_headers"] = headers
    if correlation_id:
        props["correlation_id"] = correlation_id
    with amqp_channel() as ch:
        ch.basic_publish(amqp.Message(body, **props), exchange="", routing_key=queue)


def v2_headers(task_id, task="celeriac.add", **extra):
    h = {"lang": "py", "task": task, "id": task_id, "eta": None, "expires": None, "retries": 0,
         "timelimit": [None, None], "root_id": task_id, "parent_id": None, "argsrepr": "()", "kwargsrepr": "{}"}
    h.update(extra)
    return h


BAD_MESSAGES = {
    "bad-json": dict(body=b'[[1, 2], {}, {"callbacks": ', headers="v2"),
    "pickle": dict(body=b"\x80\x04\x95\x10\x00\x00\x00", content_type="application/x-python-serialize", headers="v2"),
    "yaml": dict(body=b"- [1, 2]\n", content_type="application/x-yaml", headers="v2"),
    "no-task-header": dict(body=json.dumps([[1, 2], {}, {}]).encode(), headers={}),
    "two-element-body": dict(body=json.dumps([[1, 2], {}]).encode(), headers="v2"),
    "kwargs-not-mapping": dict(body=json.dumps([[1, 2], [3], {}]).encode(), headers="v2"),
    "bad-eta": dict(body=json.dumps([[1, 2], {}, {}]).encode(), headers="v2", extra={"eta": "next tuesday"}),
    "args-not-list": dict(body=json.dumps(["x", {}, {}]).encode(), headers="v2"),
}


def test_malformed_messages_are_dead_lettered_and_the_worker_goes_on(start_worker, rpc_app, queue_name):
    declare_with_dead_letters(queue_name)
    ids = {}
    for kind, spec in BAD_MESSAGES.items():
        task_id = f"{kind}-{uuid.uuid4()}"
        ids[kind] = task_id
        headers = spec["headers"]
        if headers == "v2":
            headers = v2_headers(task_id, **spec.get("extra", {}))
        publish_raw(queue_name, spec["body"], spec.get("content_type", "application/json"), headers, correlation_id=task_id)
    # The worker declares the queue without DLX arguments: it must fall back
    # to using the queue as Python declared it rather than crash.
    w = start_worker("--result-backend", "rpc://")
    for kind, task_id in ids.items():
        w.wait_for_log(f"invalid task message {task_id}")
    wait_until(lambda: queue_depth(queue_name + ".dlq") == len(BAD_MESSAGES), what="all bad messages dead-lettered")
    assert queue_depth(queue_name) == 0
    log = w.log()
    assert "untrusted content of type application/x-python-serialize" in log
    assert "can't decode message body" in log
    # A Python producer that knows the queue's arguments still gets its results.
    rpc_app.conf.task_queues = [Queue(queue_name, Exchange(queue_name), routing_key=queue_name,
                                      queue_arguments={"x-dead-letter-exchange": queue_name + ".dlx"})]
    assert rpc_app.send_task("celeriac.add", (2, 2)).get(timeout=15) == 4
    assert w.alive()


def test_bad_flags_exit_64_with_one_line():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY", "BROKER", "CELERIAC"))}
    cases = [
        (["--pool", "threads"], "--pool"),
        (["--concurrency", "lots"], "--concurrency"),
        (["-c", "-1"], "--concurrency: must be at least 1"),
        (["--loglevel", "LOUD"], "--loglevel"),
        (["--result-backend", "mongodb://db"], "--result-backend"),
        (["--no-such-flag"], "--no-such-flag"),
    ]
    for args, name in cases:
        p = subprocess.run([worker_binary(), "worker", *args], env=env, capture_output=True, text=True, timeout=10)
        assert p.returncode == 64, (args, p.returncode, p.stderr)
        lines = [l for l in p.stderr.splitlines() if l.strip()]
        assert len(lines) == 1 and name in lines[0], (args, p.stderr)
    p = subprocess.run([worker_binary(), "worker"], env=dict(env, CELERIAC_CONCURRENCY="-1"), capture_output=True,
                       text=True, timeout=10)
    assert p.returncode == 64 and p.stderr == "celeriac: error: --concurrency: must be at least 1, not -1\n", p.stderr


def test_a_state_dir_nothing_can_be_written_in_is_refused_at_startup():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY", "BROKER", "CELERIAC"))}
    # /sys exists but takes no new file, even from root (the tests run as root). Nothing listens
    # on the broker port given, so a worker that started anyway would not reach the shared broker.
    p = subprocess.run([worker_binary(), "worker", "--state-dir", "/sys", "-b", "amqp://guest:guest@127.0.0.1:9//",
                        "--boot-timeout", "2", "--metrics-bind", "none"],
                       env=env, capture_output=True, text=True, timeout=20)
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert p.returncode == 64, (p.returncode, p.stderr)
    assert len(lines) == 1 and lines[0].startswith("celeriac: error: --state-dir: cannot write in /sys: "), p.stderr
    assert p.stdout == "", "refused before the banner"


def test_bad_env_var_names_the_variable_and_hides_the_password():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY", "BROKER", "CELERIAC"))}
    env["CELERY_BROKER_URL"] = "redis://user:hunter2secret@localhost:6379/0"
    p = subprocess.run([worker_binary(), "worker"], env=env, capture_output=True, text=True, timeout=10)
    assert p.returncode == 64
    assert "CELERY_BROKER_URL" in p.stderr and "hunter2secret" not in p.stderr


def test_wrong_broker_password_fails_clearly_without_leaking_it(start_worker):
    w = start_worker(broker="amqp://guest:wrong-hunter2@127.0.0.1:5672//", ready=False)
    code = w.proc.wait(timeout=60)
    log = w.log()
    assert code != 0
    assert "wrong-hunter2" not in log
    assert "amqp://guest:********@127.0.0.1:5672//" in log


def test_quorum_queue_declared_by_python(start_worker, rpc_app, queue_name):
    with amqp_channel() as ch:
        ch.exchange_declare(queue_name, "direct", durable=True, auto_delete=False)
        ch.queue_declare(queue_name, durable=True, auto_delete=False, arguments={"x-queue-type": "quorum"})
        ch.queue_bind(queue_name, queue_name, queue_name)
    start_worker("--result-backend", "rpc://")
    rpc_app.conf.task_default_queue_type = "quorum"
    assert [rpc_app.send_task("celeriac.add", (i, 1)).get(timeout=15) for i in range(5)] == [1, 2, 3, 4, 5]
    # And a worker told to declare quorum queues declares them identically.
    w2 = start_worker("--result-backend", "rpc://", "--queue-type", "quorum")
    assert "exists with other arguments" not in w2.log()


def test_unreachable_broker_stops_after_the_boot_timeout(start_worker):
    w = start_worker("--boot-timeout", "2", broker="amqp://guest:s3cret-pw@127.0.0.1:1//", ready=False)
    code = w.proc.wait(timeout=60)
    log = w.log()
    assert code != 0
    assert "still failing after 2s" in log and "Connection refused" in log
    assert "s3cret-pw" not in log
