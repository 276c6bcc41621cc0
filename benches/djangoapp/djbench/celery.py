"""The Celery app of the Django bench project (benches/python_tasks.py --apps django):
``celery -A djbench worker`` and ``celeriac -A djbench worker``, set up the usual
Django way (as examples/django-app's ``shop``)."""

import os

from celery import Celery

# Before the app is created: Celery installs its Django fixup when this is set.
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "djbench.settings")

app = Celery("djbench")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
