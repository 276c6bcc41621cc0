"""celeriac against a real RabbitMQ 4.x node (the rabbit4 fixture: Debian
trixie's rabbitmq-server, run from the root that tests/setup/rabbitmq4.sh
builds), with a Python Celery client.

The nodes deny the two deprecated features that RabbitMQ 4.3 denies by
default, transient non-exclusive queues and global QoS (RABBITMQ_4_3_RULES in
conftest.py), so on an older 4.x the worker is held to 4.3's rules all the
same. How a 4.0 node denies them differs, and the tests check both ways:
- a transient non-exclusive queue.declare closes the connection (541, naming
  `transient_nonexcl_queues`): a worker that declared one could not run;
- basic.qos global=true is accepted but applied per consumer, and the first
  consumer behind it makes the node log, once per node, that `global_qos` is
  not permitted: test_worker_keeps_4_3_rules reads the log of a node of its
  own before and after a client that does it."""

import json

import amqp
import pytest

from conftest import amqp_channel, celery_app, wait_until
from private_broker import rabbitmq4_install

GLOBAL_QOS_DENIED = "Feature `global_qos` is deprecated"


def version_tuple(text):
    return tuple(int(part) for part in text.split("-")[0].split(".")[:3])


def listing(node, what, *columns):
    """rabbitmqctl list_<what> COLUMNS, as a list of dicts."""
    return json.loads(node.ctl(f"list_{what}", *columns, "--formatter", "json", "--quiet"))


def quorum_app(node, queue):
    app = celery_app(queue, "rpc://", broker=node.url)
    app.conf.task_default_queue_type = "quorum"  # as the worker declares it
    return app


def test_node_is_rabbitmq_4(rabbit4):
    props = rabbit4.server_properties()
    assert props["product"] == "RabbitMQ"
    version = props["version"]
    assert version_tuple(version) >= (4, 0, 0), version
    assert rabbit4.ctl("version").strip() == version
    # The node runs the Debian package the setup script installed.
    package = rabbitmq4_install()["RABBITMQ4_VERSION"]
    assert package.startswith(version + "-"), (package, version)
    print(f"RabbitMQ {version} (Debian {package}), booted in {rabbit4.boot_seconds[0]:.1f} s")


def test_node_refuses_transient_non_exclusive_queues(rabbit4, queue_name):
    """Without this, a worker running on the node would prove nothing on 4.0-4.2."""
    with pytest.raises(amqp.exceptions.AMQPError, match="transient_nonexcl_queues"):
        with amqp_channel(rabbit4.url) as ch:
            ch.queue_declare(queue_name, durable=False, exclusive=False, auto_delete=True)
    with amqp_channel(rabbit4.url) as ch:  # exclusive, or durable, is fine
        ch.queue_declare(queue_name, durable=False, exclusive=True, auto_delete=True)


def test_quorum_queue_round_trip(rabbit4, start_worker, queue_name):
    w = start_worker("--queue-type", "quorum", "--result-backend", "rpc://", broker=rabbit4.url)
    app = quorum_app(rabbit4, queue_name)
    try:
        assert app.send_task("celeriac.add", (2, 3)).get(timeout=30) == 5
        assert app.send_task("celeriac.add", (1.5,), {"y": 2}).get(timeout=30) == 3.5
    finally:
        app.close()
    [queue] = [q for q in listing(rabbit4, "queues", "name", "type", "durable") if q["name"] == queue_name]
    assert queue["type"] == "quorum" and queue["durable"] is True, queue
    assert w.alive()


def test_worker_keeps_4_3_rules(rabbitmq4_node, start_worker, queue_name):
    # A node of this test's own: the node logs a denied global QoS only once.
    node = rabbitmq4_node("rabbitmq4-rules")
    assert GLOBAL_QOS_DENIED not in node.broker_log()
    w = start_worker("--queue-type", "quorum", "--result-backend", "rpc://", broker=node.url)
    hostname = f"w0-{queue_name}@"

    # Per-consumer QoS: the worker's consumers have a prefetch and the node saw no global QoS.
    connections = listing(node, "connections", "pid", "client_properties")
    mine = {c["pid"] for c in connections
            if any(p[0] == "connection_name" and p[-1].startswith(f"celeriac {hostname}")
                   for p in c["client_properties"])}
    assert mine, connections
    channels = {c["pid"] for c in listing(node, "channels", "pid", "connection") if c["connection"] in mine}
    consumers = [c for c in listing(node, "consumers", "queue_name", "channel_pid", "prefetch_count")
                 if c["channel_pid"] in channels and c["queue_name"] == queue_name]
    assert consumers and all(c["prefetch_count"] > 0 for c in consumers), consumers
    assert GLOBAL_QOS_DENIED not in node.broker_log()

    # The pidbox queue is exclusive, and control works through it.
    app = quorum_app(node, queue_name)
    try:
        [reply] = app.control.ping(timeout=5)
        [(name, pong)] = reply.items()
        assert name.startswith(hostname) and pong == {"ok": "pong"}
        assert app.send_task("celeriac.add", (20, 22)).get(timeout=30) == 42
    finally:
        app.close()
    pidbox = [q for q in listing(node, "queues", "name", "exclusive", "durable")
              if q["name"].startswith(hostname) and q["name"].endswith(".celery.pidbox")]
    assert len(pidbox) == 1 and pidbox[0]["exclusive"] is True and pidbox[0]["durable"] is False, pidbox
    assert GLOBAL_QOS_DENIED not in node.broker_log()
    assert w.alive()

    # The same log does show a client that asks for global QoS.
    with amqp_channel(node.url) as ch:
        ch.queue_declare(queue_name + ".global", durable=True, auto_delete=True)
        ch.basic_qos(0, 10, True)
        ch.basic_consume(queue_name + ".global", callback=lambda message: None)
        wait_until(lambda: GLOBAL_QOS_DENIED in node.broker_log(), 10, "the node logs the global QoS")
