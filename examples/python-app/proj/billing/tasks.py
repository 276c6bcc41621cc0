"""Billing: plain tasks declared with @shared_task, kombu's JSON types, and the
project's own exception."""

import datetime
import decimal
import uuid

from celery import shared_task

from proj.errors import PaymentDeclined

# Values the worker builds itself, to check that results carry kombu's types too.
MADE = {
    "aware": datetime.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=datetime.timezone.utc),
    "naive": datetime.datetime(2026, 1, 2, 3, 4, 5),
    "date": datetime.date(2026, 2, 28),
    "time": datetime.time(13, 14, 15, 16),
    "decimal": decimal.Decimal("1234.5600"),
    "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
    "bytes_utf8": b"plain bytes",
    "bytes_binary": b"\x00\xff\xfe",
}


@shared_task
def add(x, y):
    return x + y


@shared_task
def tsum(numbers):
    return sum(numbers)


@shared_task
def roundtrip(*values, **named):
    """Returns what it received (with the type names it saw) and values of its own."""
    return {
        "types": [type(v).__name__ for v in values],
        "named_types": {k: type(v).__name__ for k, v in sorted(named.items())},
        "values": list(values),
        "named": named,
        "made": MADE,
    }


@shared_task
def charge(card, amount):
    raise PaymentDeclined(f"card {card} declined for {amount}")
