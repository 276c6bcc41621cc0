"""Django settings of the bench project. The database is a libpq URL in
BENCH_DATABASE_URL (benches/python_tasks.py starts a private PostgreSQL
cluster and sets it).

Connections are persistent, so each task process keeps one open between
tasks under both workers: CONN_MAX_AGE = 600 for Django, and
CELERY_DB_REUSE_MAX for Celery's Django fixup, which otherwise (Celery 5.7)
calls connection.close() before and after every task whatever CONN_MAX_AGE
says (it then closes them every 2 x DB_REUSE_MAX task signals, i.e. every
1,000,000 tasks here). BENCH_DB_REUSE_MAX=0: Celery's default, a new
connection for every task."""

import os
import urllib.parse

SECRET_KEY = "bench-only-not-a-secret"
DEBUG = False
ALLOWED_HOSTS = []
INSTALLED_APPS = ["rows"]
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

_url = urllib.parse.urlsplit(os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/bench"))
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": urllib.parse.unquote(_url.path.lstrip("/")),
        "USER": urllib.parse.unquote(_url.username or ""),
        "PASSWORD": urllib.parse.unquote(_url.password or ""),
        "HOST": _url.hostname or "",
        "PORT": str(_url.port or ""),
        "CONN_MAX_AGE": 600,
        "OPTIONS": {"application_name": "djbench"},
    },
}

CELERY_BROKER_URL = os.environ.get("BENCH_BROKER", "amqp://guest:guest@127.0.0.1:5672//")
CELERY_WORKER_HIJACK_ROOT_LOGGER = True
CELERY_DB_REUSE_MAX = int(os.environ.get("BENCH_DB_REUSE_MAX", "1000000")) or None
