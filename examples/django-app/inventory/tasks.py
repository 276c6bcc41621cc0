"""Tasks of the inventory app (found by ``app.autodiscover_tasks()``)."""

import time

from celery import shared_task
from django.db import connection, transaction

from inventory.models import Order, OutOfStock, Product


@shared_task
def add_product(sku, name, stock):
    product = Product.objects.create(sku=sku, name=name, stock=stock)
    return {"sku": product.sku, "name": product.name, "stock": product.stock}


@shared_task
def stock_of(sku):
    return Product.objects.get(sku=sku).stock


@shared_task
def count_products(prefix):
    return Product.objects.filter(sku__startswith=prefix).count()


@shared_task
def reserve(sku, quantity, hold=0.0):
    """Takes `quantity` off the product's stock and records a pending order, under a row lock; the order is
    confirmed by another task once (and only if) the transaction commits."""
    with transaction.atomic():
        product = Product.objects.select_for_update().get(sku=sku)
        if hold:
            time.sleep(hold)  # work done while holding the lock
        if product.stock < quantity:
            raise OutOfStock(f"{sku}: {quantity} wanted, {product.stock} in stock")
        product.stock -= quantity
        product.save(update_fields=["stock"])
        order = Order.objects.create(product=product, quantity=quantity)
        transaction.on_commit(lambda: confirm_order.delay(order.pk))
    return {"sku": sku, "quantity": quantity, "stock_left": product.stock}


@shared_task
def confirm_order(order_id):
    updated = Order.objects.filter(pk=order_id, status=Order.PENDING).update(status=Order.CONFIRMED)
    order = Order.objects.select_related("product").get(pk=order_id)
    return {"sku": order.product.sku, "quantity": order.quantity, "status": order.status, "updated": updated}


@shared_task
def lock_outside_transaction(sku):
    """select_for_update() in autocommit mode: Django refuses it."""
    return list(Product.objects.select_for_update().filter(sku=sku).values_list("stock", flat=True))


@shared_task
def connection_state():
    """Whether the task found the process's database connection already open, and whether its server process
    (backend) is the one the worker's main process opened in worker_init."""
    from shop import worker_signals

    open_at_start = connection.connection is not None
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (backend,) = cursor.fetchone()
    return {"open_at_start": open_at_start,
            "main_backend": worker_signals.MAIN_BACKEND_PID is not None and backend == worker_signals.MAIN_BACKEND_PID}


@shared_task
def hold_connection(seconds):
    """Keeps the database busy for `seconds` (pg_sleep on the server)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_sleep(%s)", [seconds])
    return "slept"
