"""The Celery application of the `shop` Django project:
``celery -A shop worker`` (or ``celeriac -A shop worker``)."""

import os

from celery import Celery

# Before the app is created: Celery installs its Django fixup when this is set.
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "shop.settings")

app = Celery("shop")
# Every Celery setting lives in Django's settings, named CELERY_<SETTING>.
app.config_from_object("django.conf:settings", namespace="CELERY")
# tasks.py of every installed Django app.
app.autodiscover_tasks()

# Worker signal receivers: the database check at worker start, and the signal log.
from shop import worker_signals  # noqa: E402,F401
