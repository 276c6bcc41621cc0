# The Celery app is loaded when Django/your code starts, so @shared_task uses it.
from .celery import app as celery_app

__all__ = ("celery_app",)
