"""Django settings of the `shop` project, Celery's included (CELERY_* names).

The database, broker, result backend and queue come from the environment, so
a deployment (or a test) points them elsewhere without editing this file:

    SHOP_DATABASE_URL   postgresql://user:password@host:port/dbname
    SHOP_DB_POOL        1: Django's psycopg connection pool (Django >= 5.1)
                        instead of persistent connections
    SHOP_DB_APP_NAME    the connections' application_name (pg_stat_activity)
"""

import os
import urllib.parse

SECRET_KEY = os.environ.get("SHOP_SECRET_KEY", "example-only-not-a-secret")
DEBUG = False
ALLOWED_HOSTS = []

INSTALLED_APPS = ["inventory"]

USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"


def _database(url, pool, app_name):
    parts = urllib.parse.urlsplit(url)
    db = {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": urllib.parse.unquote(parts.path.lstrip("/")),
        "USER": urllib.parse.unquote(parts.username or ""),
        "PASSWORD": urllib.parse.unquote(parts.password or ""),
        "HOST": parts.hostname or "",
        "PORT": str(parts.port or ""),
        "OPTIONS": {"application_name": app_name},
    }
    if pool:
        # One pool per process; Django requires CONN_MAX_AGE = 0 with it.
        db["OPTIONS"]["pool"] = True
        db["CONN_MAX_AGE"] = 0
    else:
        # Persistent connections: kept open for up to 10 minutes between uses.
        db["CONN_MAX_AGE"] = 600
    return db


DATABASES = {
    "default": _database(
        os.environ.get("SHOP_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/shop"),
        pool=os.environ.get("SHOP_DB_POOL") == "1",
        app_name=os.environ.get("SHOP_DB_APP_NAME", "shop"),
    ),
}

CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "amqp://guest:guest@localhost:5672//")
CELERY_RESULT_BACKEND = os.environ.get("CELERY_RESULT_BACKEND", "redis://localhost:6379/0")
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# Where .delay() sends (from views and from tasks), and what a worker without -Q consumes.
CELERY_TASK_DEFAULT_QUEUE = os.environ.get("SHOP_TASK_QUEUE", "shop")
