from django.db import models


class Item(models.Model):
    """The rows the bench task reads (created with `migrate --run-syncdb`: no migrations)."""

    sku = models.CharField(max_length=64, unique=True)
    name = models.CharField(max_length=200)
    stock = models.IntegerField(default=0)
