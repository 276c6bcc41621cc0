"""Log lines an operator's parsing and alerts depend on. In the text format a
celeriac task line has the shape of the same line from `celery worker`
(checked against a real Celery 5.7 prefork worker running tasks of the same
names); in the JSON format every line is an object with the task fields."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid

from conftest import BROKER, celery_app

STAMP = r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}: (?P<level>[A-Z]+)/(?P<process>[\w-]+)\] "


def normalize(line, ids):
    """A log line with its time, process number, task ids and runtime made generic."""
    m = re.match(STAMP + "(?P<message>.*)$", line)
    if not m:
        return None
    message = m.group("message")
    for name, task_id in ids.items():
        message = message.replace(task_id, f"<{name}>")
    message = re.sub(r"succeeded in [0-9.e-]+s", "succeeded in <t>s", message)
    process = re.sub(r"\d+$", "N", m.group("process"))
    return f"{m.group('level')}/{process} {message}"


def task_lines(log, ids):
    lines = [normalize(l, ids) for l in log.splitlines()]
    return sorted(l for l in lines if l and "Task celeriac." in l)


def send_both(app):
    ok = app.send_task("celeriac.add", (2, 3))
    bad = app.send_task("celeriac.fail", ("boom",))
    assert ok.get(timeout=30) == 5
    try:
        bad.get(timeout=30)
    except RuntimeError:
        pass
    return {"ok": ok.id, "bad": bad.id}


CELERY_APP = '''
from celery import Celery
app = Celery("logshape")

@app.task(name="celeriac.add")
def add(x, y):
    return x + y

@app.task(name="celeriac.fail")
def fail(message, kind="RuntimeError"):
    raise RuntimeError(message)
'''


def wait_for(path, text, proc, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in path.read_text(errors="replace"):
            return
        assert proc.poll() is None, path.read_text()
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not logged:\n{path.read_text()}")


def test_text_task_lines_have_celerys_shape(start_worker, tmp_path, queue_name):
    # celeriac
    w = start_worker("-c", "1", "--result-backend", "rpc://")
    app = celery_app(queue_name)
    ids = send_both(app)
    time.sleep(0.5)
    ours = task_lines(w.log(), ids)
    # Celery 5.7 prefork, tasks of the same names
    (tmp_path / "logshape.py").write_text(CELERY_APP)
    log = tmp_path / "celery.log"
    q2 = f"{queue_name}-celery"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY", "BROKER"))}
    env.update(CELERY_BROKER_URL=BROKER, CELERY_RESULT_BACKEND="rpc://")
    celery = os.path.join(os.path.dirname(sys.executable), "celery")
    with open(log, "wb") as out:
        proc = subprocess.Popen([celery, "-A", "logshape", "worker", "-P", "prefork", "-c", "1", "-Q", q2, "-l", "INFO",
                                 "-n", f"logshape-{uuid.uuid4().hex[:6]}@%h", "--without-mingle", "--without-gossip"],
                                cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(log, "ready.", proc)
        app2 = celery_app(q2)
        ids2 = send_both(app2)
        app2.close()
        time.sleep(0.5)
        theirs = task_lines(log.read_text(), ids2)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    app.close()
    # Celery logs "received" from its main process; celeriac's task process receives itself.
    theirs = sorted(l.replace("INFO/MainProcess Task", "INFO/ForkPoolWorker-N Task") for l in theirs)
    assert ours == theirs, f"celeriac: {ours}\nCelery:   {theirs}"
    assert any("succeeded in <t>s: 5" in l for l in ours) and any("raised unexpected" in l for l in ours)


def test_json_lines_carry_task_fields(start_worker, queue_name):
    w = start_worker("-c", "1", "--result-backend", "rpc://", "--log-format", "json")
    app = celery_app(queue_name)
    ids = send_both(app)
    app.close()
    time.sleep(0.5)
    w.stop()
    objects = []
    for line in w.log().splitlines():
        if line.strip():
            objects.append(json.loads(line))  # every line, the banner included, is JSON
    banner = next(o for o in objects if o.get("message") == "ready to start")
    assert "celeriac.add" in banner["tasks"] and banner["queues"] == [queue_name]
    ok = next(o for o in objects if o.get("task_id") == ids["ok"] and o.get("state") == "SUCCESS")
    assert ok["task_name"] == "celeriac.add" and ok["runtime"] >= 0 and ok["queue"] == queue_name
    assert ok["level"] == "INFO" and ok["process"].startswith("ForkPoolWorker-")
    assert ok["hostname"].startswith("w0-") and isinstance(ok["pid"], int)
    bad = next(o for o in objects if o.get("task_id") == ids["bad"] and o.get("state") == "FAILURE")
    assert bad["exception"] == "RuntimeError" and bad["level"] == "ERROR"
    received = [o for o in objects if o.get("state") == "RECEIVED"]
    assert {o["task_id"] for o in received} == set(ids.values())
