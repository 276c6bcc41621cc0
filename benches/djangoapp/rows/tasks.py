"""The bench tasks (found by ``app.autodiscover_tasks()``)."""

from celery import shared_task

from rows.models import Item


@shared_task(name="djbench.read_row", ignore_result=True)
def read_row(pk):
    """One row through the ORM: SELECT ... WHERE id = %s on the process's persistent connection."""
    return Item.objects.get(pk=pk).stock

