"""The Celery application: ``celery -A proj worker`` (or ``celeriac -A proj worker``)."""

from celery import Celery

app = Celery("proj")
app.config_from_object("proj.settings", namespace="CELERY")
app.autodiscover_tasks(["proj.billing", "proj.ops", "proj.orchestration", "proj.limits"])

# Signal receivers (a JSON line per signal when PROJ_SIGNAL_LOG is set) and
# OpenTelemetry (when PROJ_OTEL_SPANS is set). Imported for their side effects.
from proj import signals, telemetry  # noqa: E402,F401
