"""An app whose queues say more than a name: queue arguments (dead letters,
TTL, overflow, single active consumer), a topic exchange, a queue bound
through two extra bindings, consumer arguments, and a task that print()s.
Names come from TOPOAPP_QUEUE so that two workers under test do not share
queues."""

import os

from celery import Celery
from celery.exceptions import Reject
from kombu import Exchange, Queue, binding

def make_app(q):
    """The app, with its queues named after ``q``."""
    app = Celery("topoapp")
    app.conf.broker_url = os.environ.get("TOPOAPP_BROKER", "amqp://guest:guest@127.0.0.1:5672//")
    app.conf.result_backend = os.environ.get("TOPOAPP_BACKEND", "redis://127.0.0.1:6379/0")
    app.conf.task_default_queue = q
    app.conf.task_queues = [
        Queue(
            q,
            Exchange(q + ".x", type="topic"),
            routing_key=q,
            queue_arguments={
                "x-dead-letter-exchange": q + ".dlx",
                "x-dead-letter-routing-key": "dead",
                "x-overflow": "reject-publish",
                "x-single-active-consumer": True,
            },
            message_ttl=600,
            max_length=10000,
            consumer_arguments={"x-priority": 7},
        ),
        Queue(
            q + ".b",
            bindings=[
                binding(Exchange(q + ".b1", type="direct"), routing_key="one"),
                binding(Exchange(q + ".b2", type="fanout", durable=False), routing_key=""),
            ],
        ),
    ]

    @app.task(name="topoapp.add", shared=False)
    def add(x, y):
        return x + y

    @app.task(name="topoapp.refuse", acks_late=True, shared=False)
    def refuse():
        raise Reject("not this one", requeue=False)

    @app.task(name="topoapp.shout", shared=False)
    def shout(text):
        print(text)
        return text

    return app


app = make_app(os.environ.get("TOPOAPP_QUEUE", "topoapp"))
