"""A task that starts others from inside the worker: delay, apply_async, a
chain, a group and a chord, returning their ids."""

from celery import chain, chord, group, shared_task

from proj.billing.tasks import add, tsum
from proj.ops.tasks import whoami


@shared_task(bind=True)
def fanout(self, x):
    delayed = add.delay(x, 1)
    later = add.apply_async((x, 2), countdown=0.2)
    chained = chain(add.s(x, 3), add.s(10))()
    grouped = group(add.s(x, i) for i in range(3))()
    chorded = chord([add.s(x, i) for i in range(2)], tsum.s())()
    child = whoami.apply_async(("from-fanout",), headers={"x_proj_tenant": "acme"})
    return {
        "delay": delayed.id,
        "apply_async": later.id,
        "chain_first": chained.parent.id,
        "chain_last": chained.id,
        "group": grouped.id,
        "group_members": [r.id for r in grouped.results],
        "chord_body": chorded.id,
        "chord_header": [r.id for r in chorded.parent.results] if chorded.parent is not None else None,
        "whoami": child.id,
    }


@shared_task
def relay(x):
    """Hands work on with .delay() and returns the new task's id."""
    return add.delay(x, x).id
