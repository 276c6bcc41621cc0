"""The Prometheus endpoint of the control process: accepted by promtool,
and its counters match the tasks actually run."""

import os
import re
import signal
import socket
import subprocess
import urllib.request

import pytest

from conftest import child_pids, own_connections, task_pids, wait_until, worker_binary


def metrics_url(w):
    w.wait_for_log("metrics on http://")
    return re.search(r"metrics on (http://\S+)", w.log()).group(1)


def scrape(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return r.read().decode()


def sample(text, name, **labels):
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else r"(?:\{\})?") + r" (\S+)"
    m = re.search("^" + pattern + "$", text, re.M)
    return float(m.group(1)) if m else None


def promtool_check(body):
    check = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_a_fresh_worker_is_scraped_before_any_task(start_worker):
    w = start_worker("-c", "1", "--metrics-bind", "127.0.0.1:0")
    text = scrape(metrics_url(w))
    promtool_check(text)
    assert sample(text, "celeriac_child_spawns_total") == 2
    assert sample(text, "celeriac_broker_reconnects_total") == 0
    assert "celeriac_tasks_total" not in text, "no task has run, so no series yet"


def test_metrics_count_what_ran_and_pass_promtool(start_worker, rpc_app):
    w = start_worker("-c", "2", "--result-backend", "rpc://", "--with-test-tasks", "--metrics-bind", "127.0.0.1:0")
    url = metrics_url(w)
    ok = [rpc_app.send_task("celeriac.add", (i, 1)) for i in range(20)]
    bad = [rpc_app.send_task("celeriac.fail", ("x",)) for _ in range(3)]
    rpc_app.send_task("nope.missing").forget()
    during = scrape(url)  # a scrape taken under load
    assert [r.get(timeout=15) for r in ok] == [i + 1 for i in range(20)]
    for r in bad:
        with pytest.raises(RuntimeError):
            r.get(timeout=15)
    wait_until(lambda: sample(scrape(url), "celeriac_tasks_total", task="nope.missing", outcome="rejected") == 1)
    text = scrape(url)
    for body in (during, text):
        promtool_check(body)
    assert sample(text, "celeriac_tasks_total", task="celeriac.add", outcome="succeeded") == 20
    assert sample(text, "celeriac_tasks_total", task="celeriac.fail", outcome="failed") == 3
    assert sample(text, "celeriac_task_runtime_seconds_count", task="celeriac.add") == 20
    assert sample(text, "celeriac_task_runtime_seconds_bucket", task="celeriac.add", le="+Inf") == 20
    assert sample(text, "celeriac_task_processes", state="consuming") == 2
    assert sample(text, "celeriac_child_spawns_total") == 3, "two task processes and the control process"
    assert sample(text, "celeriac_tasks_active") == 0
    assert sample(text, "celeriac_events_published_total") >= 1, "worker-online and heartbeats are always sent"
    assert sample(text, "celeriac_build_info", version=re.search(r'version="([^"]+)"', text).group(1),
                  hostname=re.search(r'hostname="([^"]+)"', text).group(1)) == 1
    # A crashed task process is counted by cause.
    victim = task_pids(w)[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: sample(scrape(url), "celeriac_child_deaths_total", cause="crashed") == 1)
    wait_until(lambda: sample(scrape(url), "celeriac_child_spawns_total") == 4)


def test_broker_reconnects_are_counted(start_worker):
    w = start_worker("-c", "2", "--metrics-bind", "127.0.0.1:0")
    url = metrics_url(w)
    node = re.search(r'hostname="([^"]+)"', scrape(url)).group(1)

    def all_three():
        ids = own_connections(node)
        return ids if len(ids) == 3 else None

    ids = wait_until(all_three, 30, "two task processes and the control process connected")
    assert sample(scrape(url), "celeriac_broker_reconnects_total") == 0
    for conn in ids:
        subprocess.run(["rabbitmqctl", "close_connection", conn, "celeriac reconnect test"], check=True,
                       capture_output=True, timeout=120)
    wait_until(lambda: sample(scrape(url), "celeriac_broker_reconnects_total") == 3, 30,
               "a reconnect counted for every process")
    w.wait_for_log("Reconnected to", count=2)
    w.wait_for_log("control connection re-established")


def test_bad_metrics_address_is_refused_at_startup():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY", "BROKER", "CELERIAC"))}
    p = subprocess.run([worker_binary(), "worker", "--metrics-bind", "everywhere"], env=env,
                       capture_output=True, text=True, timeout=10)
    assert p.returncode == 64 and "--metrics-bind" in p.stderr and len(p.stderr.strip().splitlines()) == 1


# The series celery-exporter's published Grafana dashboards query, with the
# labels their expressions select or group by (read from the exporter's
# source and its dashboards, not copied).
EXPORTER_SERIES = {
    "celery_task_received_total": {"name", "hostname", "queue_name"},
    "celery_task_started_total": {"name", "hostname", "queue_name"},
    "celery_task_succeeded_total": {"name", "hostname", "queue_name"},
    "celery_task_failed_total": {"name", "hostname", "queue_name", "exception"},
    "celery_task_retried_total": {"name", "hostname", "queue_name"},
    "celery_task_rejected_total": {"name", "hostname", "queue_name"},
    "celery_task_revoked_total": {"name", "hostname", "queue_name"},
    "celery_task_runtime_bucket": {"name", "hostname", "queue_name", "le"},
    "celery_task_runtime_sum": {"name", "hostname", "queue_name"},
    "celery_task_runtime_count": {"name", "hostname", "queue_name"},
    "celery_worker_up": {"hostname"},
    "celery_worker_tasks_active": {"hostname"},
}


def series(text):
    """{metric name: [labels dict, value]} for every sample line."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$", line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            out.setdefault(m.group(1), []).append((labels, float(m.group(3))))
    return out


def value_of(found, metric, **labels):
    """The value of the sample of `metric` with exactly these labels, or None."""
    return next((v for l, v in found.get(metric, []) if l == labels), None)


def test_celery_exporter_series_for_its_dashboards(start_worker, rpc_app, queue_name):
    w = start_worker("-c", "2", "--metrics-bind", "127.0.0.1:0", "--result-backend", "rpc://")
    url = metrics_url(w)
    ok = [rpc_app.send_task("celeriac.add", (i, 1)) for i in range(3)]
    bad = rpc_app.send_task("celeriac.fail", ("x", "ValueError"))
    assert [r.get(timeout=15) for r in ok] == [1, 2, 3]
    with pytest.raises(ValueError):
        bad.get(timeout=15)
    # The node is w0-<queue>@<machine>: the exporter labels it by the machine part.
    add = {"name": "celeriac.add", "hostname": socket.gethostname(), "queue_name": queue_name}
    wait_until(lambda: value_of(series(scrape(url)), "celery_task_succeeded_total", **add) == 3)
    text = scrape(url)
    promtool_check(text)
    found = series(text)
    for metric, keys in EXPORTER_SERIES.items():
        assert metric in found, f"{metric} missing"
        assert all(set(l) == keys for l, _ in found[metric]), (metric, found[metric])
    assert value_of(found, "celery_task_received_total", **add) == 3
    assert value_of(found, "celery_task_started_total", **add) == 3
    assert value_of(found, "celery_task_runtime_count", **add) == 3
    fail = dict(add, name="celeriac.fail")
    assert value_of(found, "celery_task_failed_total", exception="ValueError", **fail) == 1
    assert value_of(found, "celery_task_succeeded_total", **fail) == 0
    assert found["celery_worker_up"] == [({"hostname": add["hostname"]}, 1.0)]
    # The worker's own families still add up per task, whatever the queue.
    assert sample(text, "celeriac_tasks_total", task="celeriac.add", outcome="succeeded") == 3


def test_a_taken_metrics_port_says_what_to_set(start_worker, redis_app):
    """A second worker on the same host finds the port taken: the one line
    names the setting that gives it a port of its own, and the worker still
    runs tasks."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        w = start_worker("-c", "1", "--metrics-bind", f"127.0.0.1:{port}", "--result-backend",
                         redis_app.conf.result_backend)
        w.wait_for_log("metrics endpoint disabled")
        line = next(l for l in w.log().splitlines() if "metrics endpoint disabled" in l)
        assert f"holds port {port}" in line and "--metrics-bind" in line and "CELERIAC_METRICS_BIND" in line, line
        assert redis_app.send_task("celeriac.add", (1, 2)).get(timeout=20) == 3
    finally:
        holder.close()


def test_a_follow_up_that_cannot_be_sent_is_logged_and_counted(start_worker, rpc_app):
    """A Rust task's link that is a group (celeriac sends plain task signatures only) never
    becomes a message: an ERROR line naming the parent task, and a counted follow-up."""
    from celery import group, signature
    w = start_worker("-c", "1", "--result-backend", "rpc://", "--metrics-bind", "127.0.0.1:0")
    url = metrics_url(w)
    assert sample(scrape(url), "celeriac_task_messages_unpublished_total", kind="follow_up") == 0
    parent = rpc_app.send_task("celeriac.add", (1, 2),
                               link=group(signature("celeriac.noop"), signature("celeriac.noop")))
    assert parent.get(timeout=15) == 3
    w.wait_for_log(f"could not send a follow-up task of {parent.id}")
    line = next(l for l in w.log().splitlines() if "could not send a follow-up task" in l)
    assert "ERROR" in line, line
    wait_until(lambda: sample(scrape(url), "celeriac_task_messages_unpublished_total", kind="follow_up") == 1,
               10, "the follow-up counted")
