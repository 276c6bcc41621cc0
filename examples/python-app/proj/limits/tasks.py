"""Decorator options: acks_late, ignore_result, time limits, rate_limit,
track_started, typing."""

import time

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded


@shared_task(acks_late=True)
def late_ack(seconds):
    time.sleep(seconds)
    return "acked late"


@shared_task
def early_ack(seconds):
    time.sleep(seconds)
    return "acked early"


@shared_task(ignore_result=True)
def fire_and_forget(x):
    return x * 2


@shared_task(time_limit=1)
def hard_limited():
    time.sleep(10)
    return "not reached"


@shared_task(soft_time_limit=0.5)
def soft_caught():
    try:
        time.sleep(10)
    except SoftTimeLimitExceeded:
        return "caught"
    return "not reached"


@shared_task(soft_time_limit=0.5)
def soft_uncaught():
    time.sleep(10)
    return "not reached"


@shared_task(rate_limit="2/s")
def throttled(n):
    return n


@shared_task(track_started=True)
def tracked(seconds):
    time.sleep(seconds)
    return "tracked"


@shared_task(typing=True)
def typed(x: int, y: int):
    return x * y
