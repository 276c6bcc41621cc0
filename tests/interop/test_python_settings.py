"""Everything Celery's worker reads from the app's configuration is honoured
by `celeriac -A <app> worker`, or refused at startup in one line naming the
setting; nothing is silently ignored (python/celeriac/_settings.py holds the
classification, docs/python-apps.md shows it).

- every setting of the installed Celery is classified, and the docs table
  names each one, so that a Celery upgrade that adds a setting fails here
  until someone decides what celeriac does with it;
- what apps commonly set (Django projects included) is served, and the
  defaults are never refused;
- refused settings stop the worker before it connects, in one line;
- honoured settings take effect: the broker heartbeat the connections
  negotiate, the prefetch the consumers get, no retry at startup, a task
  process that starts too slowly replaced."""

import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import pytest
from celery import Celery
from celery.app.defaults import NAMESPACES, flatten

from conftest import BROKER, REDIS_URL, ROOT, wait_until

APPS = pathlib.Path(__file__).parent / "pyapps"
CELERIAC = pathlib.Path(sys.executable).parent / "celeriac"
DOCS = ROOT / "docs" / "python-apps.md"


def load_settings_module():
    """python/celeriac/_settings.py from the checkout (it imports nothing of celeriac's)."""
    spec = importlib.util.spec_from_file_location("celeriac_settings_under_test",
                                                  ROOT / "python" / "celeriac" / "_settings.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


settings = load_settings_module()
CELERY_SETTINGS = sorted(key for key, _ in flatten(NAMESPACES))


def app_with(**conf):
    app = Celery("settings-test", set_as_current=False)
    app.conf.update(conf)
    return app


# --- the classification ---

def test_every_setting_of_celery_is_classified():
    unknown = [key for key in CELERY_SETTINGS if settings.handling(key) is None]
    assert not unknown, f"settings of this Celery that celeriac has not classified: {unknown}"
    # The worker's own settings one by one, never by prefix.
    unlisted = [key for key in CELERY_SETTINGS if key.startswith("worker_") and key not in settings.SETTINGS]
    assert not unlisted, unlisted
    stale = sorted(set(settings.SETTINGS) - set(CELERY_SETTINGS))
    assert not stale, f"classified, but not settings of this Celery: {stale}"
    kinds = {kind for kind, _ in settings.SETTINGS.values()}
    assert kinds <= set(settings.HONOURED + settings.NOT_APPLICABLE + (settings.REFUSED, settings.BY_VALUE)), kinds
    by_value = {key for key, (kind, _) in settings.SETTINGS.items() if kind == settings.BY_VALUE}
    assert by_value == set(settings.CHECKS), "a check for each setting served by value, and no other"


def docs_section():
    text = DOCS.read_text()
    start = text.index("## Configuration from the app")
    return text[start:text.index("\n## ", start + 1)]


def test_the_docs_table_names_every_setting():
    section = docs_section()
    missing = [key for key in settings.SETTINGS if f"`{key}`" not in section]
    missing += [prefix for prefix in settings.PREFIXES if f"`{prefix}*`" not in section]
    assert not missing, f"not in the docs' table: {missing}"


def test_the_defaults_and_what_apps_commonly_set_are_served():
    assert settings.refusal(app_with().conf) is None
    # Every setting at its default value, written out.
    from celery.app.defaults import DEFAULTS
    assert settings.refusal(app_with(**{k: v for k, v in DEFAULTS.items() if v is not None}).conf) is None
    common = dict(
        broker_url="amqps://user:secret@rabbit.example:5671/prod",
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": 3600, "confirm_publish": True, "max_retries": 3},
        broker_pool_limit=None,
        broker_login_method="AMQPLAIN",
        broker_use_ssl=True,
        accept_content=["application/json"],
        result_accept_content=["json"],
        task_serializer="json",
        result_backend="django-db",
        result_extended=True,
        result_expires=3600,
        timezone="Europe/Paris",
        enable_utc=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_track_started=True,
        task_time_limit=1800,
        task_soft_time_limit=1500,
        task_default_queue="default",
        task_routes={"proj.tasks.*": {"queue": "default"}},
        task_send_sent_event=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=4,
        worker_max_tasks_per_child=100,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_send_task_events=True,
        worker_deduplicate_successful_tasks=True,
        worker_proc_alive_timeout=30,
        control_queue_ttl=300,
        beat_schedule={"tick": {"task": "proj.tasks.tick", "schedule": 60}},
    )
    assert settings.refusal(app_with(**common).conf) is None
    app = app_with(**common)

    @app.task(name="proj.tasks.tick", rate_limit="1/s")
    def tick():
        pass
    app.finalize(auto=True)
    assert settings.task_refusal(app) is None


def test_a_setting_left_alone_is_not_refused_but_a_changed_one_is():
    # worker_enable_remote_control=None is falsy: Celery's worker then has no remote control.
    line = settings.refusal(app_with(worker_enable_remote_control=None, control_queue_ttl=300.0).conf)
    assert line.count("=") == 1 and "worker_enable_remote_control=None" in line, line
    line = settings.refusal(app_with(broker_url="amqp://u:secret@h//;amqp://u:secret@g//").conf)
    assert "broker_url=" in line and "secret" not in line, line


def test_settings_mapped_onto_options_become_worker_words():
    app = app_with(broker_url="amqp://u:p@h:5672//", broker_heartbeat=15, broker_connection_timeout=2.5,
                   broker_connection_max_retries=None, worker_proc_alive_timeout=12)
    assert settings.refusal(app.conf) is None
    assert settings.broker_url(app.conf) == "amqp://u:p@h:5672//?heartbeat=15&connection_timeout=2500"
    assert settings.words(app.conf) == [f"--boot-timeout={settings.FOREVER}", "--child-heartbeat-timeout=12"]
    # A heartbeat in the URL wins over broker_heartbeat, as in kombu.
    app = app_with(broker_url="amqp://u:p@h//?heartbeat=5", broker_heartbeat=15,
                   broker_connection_retry_on_startup=False)
    assert settings.broker_url(app.conf) == "amqp://u:p@h//?heartbeat=5"
    assert settings.words(app.conf) == ["--boot-timeout=0"]
    # Left alone, nothing is added.
    app = app_with(broker_url="amqp://u:p@h//")
    assert settings.broker_url(app.conf) == "amqp://u:p@h//" and settings.words(app.conf) == []


# --- the worker ---

def run_refused(tmp_path, env, *args):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY", "BROKER", "CELERIAC"))}
    full_env.update(env)
    # At INFO a worker that went on would log its connection attempts (the app's broker refuses them).
    return subprocess.run([str(CELERIAC), "-A", "settingsapp", "worker", "--workdir", str(APPS),
                           "--metrics-bind", "none", "-l", "INFO", "--state-dir", str(tmp_path / "state"), *args],
                          capture_output=True, text=True, timeout=60, env=full_env)


@pytest.mark.parametrize("env, args, words", [
    ({"SETTINGSAPP_CONF": json.dumps({"worker_direct": True, "control_exchange": "ctl"})}, (),
     ("worker_direct=True", "control_exchange='ctl'")),
    ({"SETTINGSAPP_DJANGO": json.dumps({"worker_enable_remote_control": False})}, (),
     ("CELERY_WORKER_ENABLE_REMOTE_CONTROL=False", "remote control")),
    ({"SETTINGSAPP_CONF": json.dumps({"worker_soft_shutdown_timeout": 30})}, (),
     ("worker_soft_shutdown_timeout=30", "--shutdown-timeout")),
    ({"SETTINGSAPP_CONF": json.dumps({"task_compression": "gzip", "event_serializer": "pickle"})}, (),
     ("task_compression='gzip'", "event_serializer='pickle'")),
    ({"SETTINGSAPP_CONF": json.dumps({"broker_transport_options": {"read_timeout": 5, "confirm_publish": True}})},
     (), ("broker_transport_options=", "read_timeout", "remove it")),
    ({"SETTINGSAPP_CONF": json.dumps({"broker_connection_max_retries": 5})}, (),
     ("broker_connection_max_retries=5", "--boot-timeout")),
    ({"SETTINGSAPP_CONF": json.dumps({"broker_heartbeat": 30})}, ("-b", "amqp://guest:guest@127.0.0.1:1//"),
     ("broker_heartbeat=30", "-b", "?heartbeat=30")),
    ({"SETTINGSAPP_TASK": json.dumps({"acks_late": True, "acks_on_failure_or_timeout": False})}, (),
     ("acks_on_failure_or_timeout=False", "settingsapp.strict")),
    ({"SETTINGSAPP_CONF": json.dumps({"worker_disable_rate_limits": True}),
      "SETTINGSAPP_TASK": json.dumps({"rate_limit": "5/s"})}, (),
     ("worker_disable_rate_limits=True", "settingsapp.strict")),
], ids=["worker", "django", "soft-shutdown", "messages", "transport-options", "max-retries", "heartbeat-with-b",
        "acks-on-failure", "disable-rate-limits"])
def test_a_refused_setting_stops_the_worker_in_one_line_before_connecting(tmp_path, env, args, words):
    p = run_refused(tmp_path, env, *args)
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0 and len(lines) == 1, p
    assert all(w in lines[0] for w in words), lines[0]
    assert "cannot connect" not in p.stderr and "retrying" not in p.stderr, "nothing tried to reach the broker"
    assert "[app]" not in p.stdout + p.stderr, "refused before the app's banner"


@pytest.fixture
def settings_worker(start_worker, queue_name):
    """start(conf, *args, **env) -> a `celeriac -A settingsapp worker` on the test's queue."""
    def start(conf=None, *args, ready=True, **env):
        full = {"SETTINGSAPP_BACKEND": REDIS_URL, "SETTINGSAPP_QUEUE": queue_name,
                "SETTINGSAPP_CONF": json.dumps(conf or {}), **env}
        return start_worker("-A", "settingsapp", "--workdir", str(APPS), *args, env=full, ready=ready,
                            binary=str(CELERIAC))
    return start


def rabbitmqctl(*args):
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        pytest.fail("rabbitmqctl is needed to read what the broker negotiated")
    p = subprocess.run([ctl, "-q", *args], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p
    return p.stdout


def test_broker_heartbeat_and_prefetch_multiplier_take_effect(settings_worker, queue_name):
    w = settings_worker({"broker_heartbeat": 17, "worker_prefetch_multiplier": 0}, "-c", "2")
    client = Celery("client", broker=BROKER, backend=REDIS_URL)
    try:
        assert client.send_task("settingsapp.add", (2, 3), queue=queue_name).get(timeout=20) == 5
    finally:
        client.close()
    node = f"w0-{queue_name}@"

    def heartbeats():
        out = rabbitmqctl("list_connections", "timeout", "client_properties")
        return [int(line.split("\t", 1)[0]) for line in out.splitlines() if node in line]
    # The control process and both task processes; Celery's default would be 120, celeriac's 60.
    wait_until(lambda: len(heartbeats()) >= 3, 20, "the worker's three connections")
    assert set(heartbeats()) == {17}, heartbeats()
    consumers = [line.split("\t") for line in rabbitmqctl("list_consumers", "queue_name", "prefetch_count").splitlines()]
    counts = [int(count) for name, count in consumers if name == queue_name]
    assert counts == [0, 0], f"no prefetch limit, as Celery with worker_prefetch_multiplier=0: {consumers}"
    assert "?heartbeat=17" in w.log()


def test_no_retry_at_startup_when_the_app_says_so(tmp_path):
    started = time.monotonic()
    p = run_refused(tmp_path, {"SETTINGSAPP_CONF": json.dumps({"broker_connection_retry_on_startup": False})},
                    "-c", "1")
    took = time.monotonic() - started
    assert p.returncode != 0 and "still failing after 0s" in p.stderr, p
    # The default --boot-timeout would retry for 30 s.
    assert took < 15, took


def test_a_task_process_that_starts_slower_than_worker_proc_alive_timeout_is_replaced(settings_worker):
    w = settings_worker({"worker_proc_alive_timeout": 2}, "-c", "1", ready=False, SETTINGSAPP_INIT_SLEEP="5")
    wait_until(lambda: re.search(r"sent no heartbeat for 2s while idle", w.log()), 20,
               "the slow task process replaced")
    assert "consuming" not in w.log()
