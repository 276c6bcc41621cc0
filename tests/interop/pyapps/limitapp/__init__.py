"""An app whose one queue is a quorum queue with a delivery limit
(`x-delivery-limit` from LIMITAPP_LIMIT) and a dead-letter exchange
`<queue>.dlx`, as an app declares it in `task_queues`. The queue's name comes
from LIMITAPP_QUEUE."""

import os

from celery import Celery
from kombu import Exchange, Queue

queue = os.environ.get("LIMITAPP_QUEUE", "limitapp")

app = Celery("limitapp")
app.conf.broker_url = os.environ.get("LIMITAPP_BROKER", "amqp://guest:guest@127.0.0.1:5672//")
app.conf.result_backend = os.environ.get("LIMITAPP_BACKEND", "redis://127.0.0.1:6379/0")
app.conf.task_default_queue = queue
app.conf.task_queues = [
    Queue(queue, Exchange(queue), routing_key=queue, queue_arguments={
        "x-queue-type": "quorum",
        "x-delivery-limit": int(os.environ.get("LIMITAPP_LIMIT", "20")),
        "x-dead-letter-exchange": queue + ".dlx",
    }),
]


@app.task(name="limitapp.add")
def add(x, y):
    return x + y
