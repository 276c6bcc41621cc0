from django.db import models


class Product(models.Model):
    sku = models.CharField(max_length=64, unique=True)
    name = models.CharField(max_length=200)
    stock = models.IntegerField(default=0)

    def __str__(self):
        return self.sku


class Order(models.Model):
    PENDING = "pending"
    CONFIRMED = "confirmed"

    product = models.ForeignKey(Product, on_delete=models.PROTECT, related_name="orders")
    quantity = models.PositiveIntegerField()
    status = models.CharField(max_length=16, default=PENDING)
    created = models.DateTimeField(auto_now_add=True)


class OutOfStock(Exception):
    """A reservation asked for more than the product's stock."""
