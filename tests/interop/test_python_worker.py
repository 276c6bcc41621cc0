"""`celeriac -A <app> worker`, the worker's side: the app loaded once in the
supervisor and run through Celery's tracer in the forked task processes,
with the supervisor still single-threaded, each task process's interpreter
forked the way `os.fork()` forks it, deaths and limits handled as for any
task, and an app celeriac cannot serve refused at startup in one line.

The outcomes themselves (values, exceptions, retries, signals, events) are
compared with `celery worker` in test_python_tasks.py."""

import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from celery import Celery

from conftest import BROKER, REDIS_URL, consuming_pids, thread_count, wait_for_consuming, wait_until

APPS = pathlib.Path(__file__).parent / "pyapps"
CELERIAC = pathlib.Path(sys.executable).parent / "celeriac"


@pytest.fixture
def app_worker(start_worker, queue_name):
    """start(*args) -> a `celeriac -A fixtureapp worker` on the test's queue."""
    def start(*args, ready=True, env=None):
        env = {"FIXTUREAPP_BROKER": BROKER, "FIXTUREAPP_BACKEND": REDIS_URL, "FIXTUREAPP_QUEUE": queue_name,
               **(env or {})}
        return start_worker("-A", "fixtureapp", "--workdir", str(APPS), *args, env=env, ready=ready,
                            binary=str(CELERIAC))
    return start


@pytest.fixture
def client(queue_name):
    app = Celery("client", broker=BROKER, backend=REDIS_URL)
    app.conf.task_default_queue = queue_name
    yield app
    app.close()


def node(queue_name, n=0):
    return f"w{n}-{queue_name}@{socket.gethostname()}"


def test_app_tasks_run_and_inspect_lists_the_apps_tasks(app_worker, client, queue_name):
    w = app_worker("-c", "2")
    assert client.send_task("fixtureapp.tasks.add", (2, 3)).get(timeout=20) == 5
    registered = client.control.inspect(destination=[node(queue_name)], timeout=5).registered()
    names = registered[node(queue_name)]
    assert "fixtureapp.tasks.add" in names and "fixtureapp.tasks.where" in names, names
    assert not [n for n in names if n.startswith("celeriac.")], "only the app's tasks, as celery worker lists"
    assert "[app] fixtureapp:" in w.log()


def test_supervisor_stays_single_threaded_and_each_process_reseeds_random(app_worker, client):
    w = app_worker("-c", "2")
    pids = wait_for_consuming(w, 2)
    assert thread_count(w.pid) == 1, "the supervisor holds the app but runs no thread"
    draws = {}
    deadline = time.monotonic() + 30
    while len(draws) < 2 and time.monotonic() < deadline:
        results = [client.send_task("fixtureapp.tasks.where") for _ in range(8)]
        for r in results:
            got = r.get(timeout=20)
            draws.setdefault(got["pid"], []).append(got["draw"])
            # The task runs on the main thread; the runtime has one thread of its own (not Python's).
            assert got["threads"] == 1, got
    assert set(draws) == set(pids), (draws, pids)
    firsts = [d[0] for d in draws.values()]
    # Without PyOS_AfterFork_Child both processes would draw the same sequence.
    assert len(set(firsts)) == 2, draws
    assert thread_count(w.pid) == 1


def test_a_task_that_exits_its_process_fails_with_its_exit_code_and_is_replaced(app_worker, client):
    w = app_worker("-c", "1")
    [pid] = wait_for_consuming(w, 1)
    r = client.send_task("fixtureapp.tasks.exit_with", (3,))
    with pytest.raises(Exception) as e:
        r.get(timeout=20)
    assert type(e.value).__name__ == "WorkerLostError", repr(e.value)
    assert "exitcode 3" in str(e.value), repr(e.value)
    [new] = wait_for_consuming(w, 1)
    assert new != pid
    assert client.send_task("fixtureapp.tasks.add", (1, 1)).get(timeout=20) == 2


def test_an_early_acked_task_whose_process_exits_at_once_runs_once(app_worker, client, tmp_path):
    # The early acknowledgement may still be in the dead process's buffers: the broker then
    # redelivers the message, and the copy must not run again (Celery acknowledges in its main
    # process, so there the message never comes back).
    w = app_worker("-c", "2", "--metrics-bind", "127.0.0.1:0")
    wait_for_consuming(w, 2)
    marks = [tmp_path / f"run-{i}" for i in range(8)]
    results = [client.send_task("fixtureapp.tasks.mark_and_exit", (str(m), 4)) for m in marks]
    for r in results:
        with pytest.raises(Exception) as e:
            r.get(timeout=60)
        assert type(e.value).__name__ == "WorkerLostError", repr(e.value)
    wait_for_consuming(w, 2)
    assert client.send_task("fixtureapp.tasks.add", (1, 1)).get(timeout=20) == 2
    runs = {m.name: m.read_text().count("ran") for m in marks}
    assert set(runs.values()) == {1}, runs
    # Each copy acknowledged without running is logged and counted.
    url = re.search(r"metrics on (http://\S+)", w.log()).group(1)
    with urllib.request.urlopen(url, timeout=5) as scraped:
        text = scraped.read().decode()
    copies = w.log().count("acknowledged the copy without running it")
    assert f"celeriac_redelivered_copies_total {copies}\n" in text, (copies, text)


def test_the_hard_limit_kills_only_that_process(app_worker, client):
    w = app_worker("-c", "2")
    pids = wait_for_consuming(w, 2)
    slow = client.send_task("fixtureapp.tasks.nap", (3,))
    r = client.send_task("fixtureapp.tasks.overrun")
    with pytest.raises(Exception) as e:
        r.get(timeout=20)
    assert type(e.value).__name__ == "TimeLimitExceeded", repr(e.value)
    assert slow.get(timeout=20) == 3, "the other process kept running its task"
    after = wait_for_consuming(w, 2)
    assert len(set(after) & set(pids)) == 1, (pids, after)


def test_max_memory_per_child_recycles_a_leaking_process(app_worker, client):
    w = app_worker("-c", "1", "--max-memory-per-child", "60000")
    [pid] = wait_for_consuming(w, 1)
    assert client.send_task("fixtureapp.tasks.add", (1, 2)).get(timeout=20) == 3
    assert wait_for_consuming(w, 1) == [pid], "a process within its limit is kept"
    assert client.send_task("fixtureapp.tasks.hoard", (80,)).get(timeout=30) == pid
    wait_until(lambda: consuming_pids(w) not in ([], [pid]), 30, "the leaking process replaced")
    assert "recycl" in w.log().lower() or "max-memory" in w.log().lower()
    assert client.send_task("fixtureapp.tasks.add", (2, 2)).get(timeout=20) == 4


def test_sigterm_drains_python_tasks_and_loses_nothing(app_worker, client):
    w = app_worker("-c", "2", "--prefetch-multiplier", "1", "--acks-late")
    wait_for_consuming(w, 2)
    results = [client.send_task("fixtureapp.tasks.nap", (0.3,)) for _ in range(6)]
    wait_until(lambda: "succeeded" in w.log(), 20, "a task to finish")
    assert w.stop(signal.SIGTERM) == 0
    done = [r for r in results if r.ready()]
    assert all(r.get(timeout=1) == 0.3 for r in done)
    # What did not run is still in the queue for the next worker.
    w2 = app_worker("-c", "2")
    assert [r.get(timeout=30) for r in results] == [0.3] * 6
    w2.stop()


@pytest.mark.parametrize("app, words", [
    ("pickleapp", ("pickle", "accept_content")),
    ("poolapp", ("worker_pool='gevent'", "prefork")),
])
def test_an_app_celeriac_cannot_serve_is_refused_before_connecting(app, words, tmp_path):
    # At INFO a worker that went on would log its connection attempts (the app's broker refuses them).
    p = subprocess.run([str(CELERIAC), "-A", app, "worker", "--workdir", str(APPS), "--metrics-bind", "none",
                        "-l", "INFO", "--state-dir", str(tmp_path / "state")],
                       capture_output=True, text=True, timeout=60)
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0 and len(lines) == 1, p
    assert all(w in lines[0] for w in words), lines[0]
    assert "connect" not in p.stderr, "nothing tried to reach the broker"


def test_an_app_whose_import_starts_a_thread_is_refused_before_forking():
    p = subprocess.run([str(CELERIAC), "-A", "threadapp", "worker", "--workdir", str(APPS), "--metrics-bind", "none",
                        "--state-dir", "/tmp/celeriac-thread-state"],
                       capture_output=True, text=True, timeout=60)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 3 and len(lines) == 1, p
    assert "started 1 thread(s)" in lines[0] and "worker_process_init" in lines[0], lines[0]


def test_python_tasks_take_the_lean_trace_path_where_they_can(app_worker, client, tmp_path):
    """Every task of the app but one with an on_success of its own gets the lean trace path
    (the DEBUG line at load names the exception and why); a success, a failure and the hooked
    task come back through the worker as Celery's tracer gives them (test_lean_trace.py compares
    the two paths call by call)."""
    w = app_worker("-c", "1", "-l", "DEBUG")
    line = next(l for l in w.log().splitlines() if "the lean trace path for" in l)
    listed = next(l for l in w.log().splitlines() if l.startswith("[tasks] ")).removeprefix("[tasks] ").split(", ")
    hooked = "fixtureapp.tasks.hooked (a custom on_success)"
    assert line.endswith("every call through Celery's tracer: " + hooked), line
    assert f"the lean trace path for {len(listed) - 1} task(s)" in line, (line, listed)
    assert client.send_task("fixtureapp.tasks.add", (2, 3)).get(timeout=20) == 5
    failed = client.send_task("fixtureapp.tasks.fails", ("no",))
    with pytest.raises(Exception) as raised:
        failed.get(timeout=20)
    assert type(raised.value).__name__ == "ValueError" and str(raised.value) == "no"
    frames = re.findall(r'File "([^"]+)", line \d+, in (\w+)', failed.traceback)
    assert [(pathlib.Path(f).name, fn) for f, fn in frames] == [
        ("trace.py", "trace_task"), ("trace.py", "__protected_call__"), ("tasks.py", "fails")], failed.traceback
    marks = tmp_path / "hooked"
    assert client.send_task("fixtureapp.tasks.hooked", (str(marks),)).get(timeout=20) == "hooked"
    # Celery's tracer stores the result before it calls on_success, so the client can see the
    # result first: wait for the mark rather than read it at once.
    wait_until(lambda: marks.exists() and marks.read_text().endswith("\n"), 20, "the hooked task's on_success")
    assert marks.read_text() == "on_success hooked\n"


def test_celeriac_lean_trace_0_sends_every_call_through_celerys_tracer(app_worker, client):
    """The switch operators (and the A/B benchmark in docs/design/python-task-cost.md) use."""
    w = app_worker("-c", "1", "-l", "DEBUG", env={"CELERIAC_LEAN_TRACE": "0"})
    line = next(l for l in w.log().splitlines() if "the lean trace path for" in l)
    assert "the lean trace path for 0 task(s)" in line and "fixtureapp.tasks.add (CELERIAC_LEAN_TRACE=0)" in line
    assert client.send_task("fixtureapp.tasks.add", (2, 3)).get(timeout=20) == 5


def test_the_apps_log_records_follow_the_log_format(app_worker, client):
    import json
    w = app_worker("-c", "1", "--log-format", "json")
    r = client.send_task("fixtureapp.tasks.chatty", ("hello",))
    assert r.get(timeout=20) == "hello"
    wait_until(lambda: "said hello" in w.log(), 10, "the task's log line")
    line = next(l for l in w.log().splitlines() if "said hello" in l)
    record = json.loads(line)
    assert record["message"] == "said hello" and record["level"] == "WARNING", record
    assert record["task_id"] == r.id and record["task_name"] == "fixtureapp.tasks.chatty", record
    assert record["process"] == "ForkPoolWorker-1", record


def test_a_thread_started_by_worker_ready_does_not_stop_the_forks(start_worker, queue_name, tmp_path):
    """worker_ready runs in the control process, which never forks: a thread
    it starts there leaves the supervisor free to replace task processes."""
    note = tmp_path / "ready.note"
    env = {"READYAPP_BROKER": BROKER, "READYAPP_BACKEND": REDIS_URL, "READYAPP_QUEUE": queue_name,
           "READYAPP_NOTE": str(note)}
    w = start_worker("-A", "readyapp", "--workdir", str(APPS), "-c", "1", env=env, binary=str(CELERIAC))
    wait_until(note.exists, 20, "worker_ready")
    ready_pid, threads = map(int, note.read_text().split()[:2])
    [pid] = wait_for_consuming(w, 1)
    assert ready_pid not in (w.pid, pid), "neither the supervisor nor a task process"
    assert threads == 2 and thread_count(w.pid) == 1
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: consuming_pids(w) not in ([], [pid]), 30, "the killed task process replaced")
    app = Celery("client", broker=BROKER, backend=REDIS_URL)
    try:
        assert app.send_task("readyapp.add", (1, 2), queue=queue_name).get(timeout=20) == 3
    finally:
        app.close()
    assert w.stop() == 0
    assert note.read_text().endswith(f"shutting-down:Warm {ready_pid} shutdown {ready_pid}"), note.read_text()
